"""tf.data input pipeline and mask-consistent augmentation.

``make_dataset`` builds batched (images, masks) for fit from an :class:`InputConfig`;
``read_examples`` yields decoded examples at their stored size for evaluate. Augmentation keys:
:mod:`tfseg.data.augment`; 3D patch sampling: :mod:`tfseg.data.patches`.
"""

from tfseg.data.augment import parse_augment
from tfseg.data.config import InputConfig
from tfseg.data.input import make_dataset, mask_fill_value, read_examples, steps_per_epoch

__all__ = ["InputConfig", "make_dataset", "read_examples", "steps_per_epoch", "mask_fill_value", "parse_augment"]
