"""Off-road segmentation: the library the pipeline's stages (stages/) are written with.

From the bottom up: errors, config (params.yaml), atomic writes, artifacts (the files stages hand to each
other); raw (dataset format), data (prepared arrays, samples), augment, synthetic; vit (backbone), heads,
segmenter; losses, metrics, class_weights; runtime (device, precision, processes); evaluation, training;
visualize, figures; predict (a command for any folder of images); codebase (the import closures).
"""
