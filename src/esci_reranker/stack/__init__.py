"""Stacking: hand-made and list features over the cross-encoder's out-of-fold outputs, gradient-
boosted trees for the three tasks, and decision rules chosen in cross-validation."""
