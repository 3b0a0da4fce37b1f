"""The data of the training application, by subject: `loading` (arguments, splits, columns, sizes, classes), `images`
(decoding, channels, normalisation, transforms, collators) and `loaders` (sharding, epoch loaders, decode-once, whole
images on the device). Each imports only the ones before it; import from the module itself."""
