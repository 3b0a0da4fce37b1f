"""The training application around the SG-MAE model package: data, the training engine, checkpoints, evaluation,
optimisation recipes, model cards and the analysis command line. A checkpoint never ships any of it."""
