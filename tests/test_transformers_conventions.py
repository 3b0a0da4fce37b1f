"""transformers' own common model and configuration tests (`ModelTesterMixin`, `ConfigTester`) run on SG-MAE.

The common tests come from the installed transformers' source distribution (see transformers_common.py). Where one
does not apply to this model it is overridden below with the project's own assertion and a one-line reason.
"""

from __future__ import annotations

import os
import tempfile
import unittest
from contextlib import contextmanager

import pytest
import torch
import transformers_common
from safetensors.torch import load_file

from modeling_sgmae import SGMAEConfig, SGMAEForImageClassification, SGMAEForPreTraining, SGMAEModel
from modeling_sgmae.configuration_sgmae import num_masked_patches

transformers_common.load()  # without the fetched files: skipped here, a failure in CI
from transformers_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor  # noqa: E402


class SGMAEModelTester:
    """Tiny SG-MAE (patch 2 on 16x16: 64 patches) in the shape transformers' common tests expect."""

    def __init__(self, parent, batch_size: int = 4, image_size: int = 16, patch_size: int = 2):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = 3
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_labels = 3
        self.is_training = True
        self.num_patches = (image_size // patch_size) ** 2
        # The backbone and the classifier see every patch plus [CLS]; the pre-training encoder the visible quarter.
        self.seq_length = self.num_patches + 1
        self.pretraining_seq_length = 1 + self.num_patches - num_masked_patches(self.num_patches, 0.75)

    def get_config(self) -> SGMAEConfig:
        return SGMAEConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=37,
            decoder_hidden_size=self.hidden_size,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=self.num_attention_heads,
            decoder_intermediate_size=37,
            num_labels=self.num_labels,
            layer_norm_eps=1e-6,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[SGMAEConfig, dict]:
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class SGMAECommonModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (SGMAEModel, SGMAEForPreTraining, SGMAEForImageClassification)
    test_resize_embeddings = False
    has_attentions = True

    def setUp(self):
        self.model_tester = SGMAEModelTester(self)
        self.config_tester = ConfigTester(self, config_class=SGMAEConfig, has_text_modality=False, hidden_size=36)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """Fixed noise for the pre-training model (its masks are random otherwise, as in ViTMAE), labels for the
        classifier."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        batch_size = inputs_dict["pixel_values"].shape[0]
        if model_class is SGMAEForPreTraining:
            generator = torch.Generator().manual_seed(42)
            inputs_dict["noise"] = torch.rand(batch_size, self.model_tester.num_patches, generator=generator)
        if return_labels and model_class is SGMAEForImageClassification:
            inputs_dict["labels"] = torch.zeros(batch_size, dtype=torch.long)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="SG-MAE takes pixel_values, not inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @contextmanager
    def _only(self, *model_classes, seq_length: int | None = None):
        """Run a common test on some of the classes (and with their encoder sequence length)."""
        saved = self.all_model_classes, self.model_tester.seq_length
        self.all_model_classes = model_classes
        self.model_tester.seq_length = seq_length or saved[1]
        try:
            yield
        finally:
            self.all_model_classes, self.model_tester.seq_length = saved

    def test_attention_outputs(self):
        """The pre-training encoder attends over [CLS] + the visible patches, the backbone over every patch."""
        with self._only(SGMAEModel, SGMAEForImageClassification):
            super().test_attention_outputs()
        with self._only(SGMAEForPreTraining, seq_length=self.model_tester.pretraining_seq_length):
            super().test_attention_outputs()

    def test_hidden_states_output(self):
        """As for the attentions: the pre-training encoder's hidden states cover only the visible patches."""
        with self._only(SGMAEModel, SGMAEForImageClassification):
            super().test_hidden_states_output()
        with self._only(SGMAEForPreTraining, seq_length=self.model_tester.pretraining_seq_length):
            super().test_hidden_states_output()

    def test_training(self):
        """The common test leaves out base models by transformers' own list, which SG-MAE is not in: SGMAEModel has
        no loss, so only the two heads train."""
        with self._only(SGMAEForPreTraining, SGMAEForImageClassification):
            super().test_training()

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        """As for test_training: only the models with a loss."""
        with self._only(SGMAEForPreTraining, SGMAEForImageClassification):
            super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    def test_model_get_set_embeddings(self):
        """The input embedding is the Conv2d patch projection, not a token table (as in transformers' ViTMAE)."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            embeddings = model.get_input_embeddings()
            self.assertIsInstance(embeddings.projection, torch.nn.Conv2d)
            self.assertIsNone(model.get_output_embeddings())

    def test_reverse_loading_mapping(self):
        """The declared conversion (vit_mae_conversion.py) reads transformers' ViTMAE layouts and is not reverted on
        save: SG-MAE writes its own layout (fused qkv), which loads back unchanged. Reading the ViTMAE layouts is
        tested against ViTMAEForPreTraining itself in test_modeling_sgmae.py (test_vit_mae_checkpoint_*)."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                self.assertEqual(
                    sorted(load_file(os.path.join(folder, "model.safetensors"))), sorted(model.state_dict())
                )
                reloaded = model_class.from_pretrained(folder)
            for name, tensor in model.state_dict().items():
                torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    def test_torch_export(self):
        """Stands in for transformers' ExportTesterMixin (not in the sdist): every model exports with torch.export
        and the exported program gives the eager outputs (the pre-training model with given noise)."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            inputs = self._prepare_for_class(inputs_dict, model_class)
            pixel_values = inputs.pop("pixel_values")
            program = torch.export.export(model, (pixel_values,), inputs)
            exported, eager = program.module()(pixel_values, **inputs), model(pixel_values, **inputs)
            for name in ("last_hidden_state", "pooler_output", "logits", "loss", "mask"):
                if name in eager:
                    torch.testing.assert_close(exported[name], eager[name], msg=f"{model_class.__name__}.{name}")


def test_without_the_fetched_files_the_common_tests_are_skipped_here_and_fail_in_ci(monkeypatch, tmp_path):
    """The tests never download: a missing cache names the command that fills it."""
    monkeypatch.setenv("SGMAE_TRANSFORMERS_TESTS", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"are not in .*: run `python \.ci/fetch_transformers_tests\.py`"):
        transformers_common.load()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"test_modeling_common\.py"):
        transformers_common.load()
