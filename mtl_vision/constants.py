"""Values of the data contract shared by every module (DESIGN.md, "Targets")."""

# Class-map pixels (and boundary / saliency pixels) that carry no supervision: unlabelled,
# padding, images without part annotation. Never counted by losses or metrics.
IGNORE_INDEX = 255

# In a validation sample whose targets stay at the image's own size while the image is resized
# (`MTINetValTransform(targets="original")`): that size, (2,) int64 (H, W); the batch's targets
# are padded to the largest (`data.datamodule.collate_padded_targets`).
ORIGINAL_SIZE_KEY = "original_size"
