"""Pruning methods, one file per family: ``static`` (DiSparse, SNIP, random, magnitude,
lottery), ``dynamic`` (DiSparse dynamic, RigL, SET) and ``adapmtl`` (learned thresholds), behind the ``Method`` interface
of ``base``. Importing this package registers the built-in methods in ``METHODS``.
"""

from dsparse.sparsity.methods.base import (
    METHODS,
    MaskInputs,
    Method,
    first_conv,
    get_method,
    method_class,
    refuse_score_init,
    register_method,
    require_static,
    verify_masks_agree,
)
from dsparse.sparsity.methods.static import StaticMethod, xavier_copy
from dsparse.sparsity.methods.dynamic import DynamicMethod
from dsparse.sparsity.methods.adapmtl import AdapMTL

__all__ = ["METHODS", "AdapMTL", "DynamicMethod", "MaskInputs", "Method", "StaticMethod", "first_conv", "get_method",
           "method_class", "refuse_score_init", "register_method", "require_static", "verify_masks_agree",
           "xavier_copy"]
