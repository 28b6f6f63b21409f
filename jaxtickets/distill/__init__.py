"""Dataset distillation by gradient matching, accelerated by model augmentation (Acc-DD).

Zhang et al., "Accelerating Dataset Distillation via Model Augmentation" (CVPR 2023), on IDC
(Kim et al., ICML 2022), with the DC, DSA and DM baselines, in one framework:

* :mod:`~jaxtickets.distill.dsa`: differentiable Siamese augmentation and CutMix;
* :mod:`~jaxtickets.distill.matching`: gradient (DC, IDC) and distribution (DM) matching,
  vmapped over (model x class);
* :mod:`~jaxtickets.distill.synthetic`: the synthetic set (init, multi-formation, export);
* :mod:`~jaxtickets.distill.augment_models`: Acc-DD's early-stage pool and perturbation;
* :mod:`~jaxtickets.distill.methods`: the methods as one compiled inner iteration;
* :mod:`~jaxtickets.distill.evaluate`: N nets trained on a set as one population.
"""

from jaxtickets.distill import augment_models, dsa, evaluate, matching, methods, synthetic

__all__ = ["augment_models", "dsa", "evaluate", "matching", "methods", "synthetic"]
