"""distributed_train: write a Dataset, a model and a loss; get a distributed training loop.

Importing the package is cheap: torch is loaded by the modules that need it, and wandb,
accelerate and matplotlib only when a run asks for them.
"""

__version__ = "0.1.0"
