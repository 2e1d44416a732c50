"""Host-side checks on batches, shared by the data and training tests."""

import numpy as np


def count_loss_tokens(batch: dict[str, np.ndarray]) -> int:
  """The number of next-token targets with weight 1: an independent numpy twin of loss.next_token_targets
  (the trainer takes each step's count from the data index; the tests check the two agree)."""
  seg = batch['segment_ids']
  target = (batch['loss_mask'][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
  return int(target.sum())
