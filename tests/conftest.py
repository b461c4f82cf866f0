"""Shared test set-up: the machine has 2 cores shared by several runs, so torch uses one thread."""
import torch

torch.set_num_threads(1)
