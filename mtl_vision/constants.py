"""Values of the data contract shared by every module (DESIGN.md, "Targets")."""

# Class-map pixels (and boundary / saliency pixels) that carry no supervision: unlabelled,
# padding, images without part annotation. Never counted by losses or metrics.
IGNORE_INDEX = 255
