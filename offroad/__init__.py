"""Off-road segmentation: the library the pipeline's stages (stages/) are written with.

From the bottom up, as README "Where things live" lists them: errors, config (params.yaml), atomic writes,
codebase (the import closures), artifacts (the files stages hand to each other); raw (dataset format), data
(prepared arrays, samples), augment, synthetic; runtime (device, precision, processes); vit (backbone), weights
(its checkpoints), heads, upsample, segmenter; losses, metrics, class_weights; launch (several processes),
evaluation, bootstrap (intervals), training; visualize, figures; the commands predict (any folder of images),
review (two revisions) and ablation (each Phase 2 part's share of the gain).
"""
