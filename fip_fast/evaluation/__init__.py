"""The evaluation harness — not the product: attacks (triggers, poisoning), data (bundled MNIST digits, ``.npz`` /
image folders), models (the demo CNN, PreAct-ResNet-18), backdoor training, metrics (ACC / ASR / RA), the
re-tuning attack (``retune``: does a hidden backdoor come back?) and smoothness measures (λ_max, Tr(H)).
Submodules are imported on use: ``from fip_fast.evaluation import attacks``.
"""
