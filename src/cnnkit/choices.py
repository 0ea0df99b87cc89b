"""The dataset and device names the configuration accepts, in a module with no imports, so the
command-line parser can offer them without loading the configuration's YAML machinery."""

DATASETS = ("hasy", "cub", "folder", "csv", "digits")
DEVICES = ("auto", "cpu", "cuda", "mps")
