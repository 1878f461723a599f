"""monai-mlbseg: MLB-Seg (consistency-guided meta-learning for bootstrapping semi-supervised segmentation) for MONAI."""

__version__ = "0.4.0"
