"""The data of the training application, by subject: `loading` (arguments, splits, columns, sizes, classes), `images`
(decoding, channels, normalisation, transforms, collators), `loaders` (sharding, epoch loaders, decode-once, whole
images on the device), `segmentation` (images with class maps: checked maps, joint augmentation, their collator) and
`shapes` (generated shapes for segmentation and detection). Each imports only the ones before it; import from the
module itself."""
