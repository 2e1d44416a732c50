"""Rematerialisation policies by name (`config.model.remat`), as MaxText names them.

'none' keeps every intermediate; 'full' recomputes the whole layer in the backward pass, keeping only its
input; the others keep the outputs of the projections they name, tagged in the model with
`jax.ad_checkpoint.checkpoint_name` ('query_proj', 'key_proj', 'value_proj', 'context' = the attention output
before o_proj, 'out_proj', 'mlpwi_0' = gate, 'mlpwi_1' = up, 'mlpwo' = down), and recompute the rest;
'minimal_offloaded' keeps what 'minimal' keeps in host memory instead of device memory.

`REMAT_POLICIES` and `check_policy` import nothing heavy (jax is imported by `remat_policy` only), so the
names can be checked without importing jax.
"""

from jaxsft import fields
from jaxsft.errors import InputError

_QKV_NAMES = ('query_proj', 'key_proj', 'value_proj')
_MINIMAL_NAMES = _QKV_NAMES + ('out_proj', 'mlpwi_0', 'mlpwi_1', 'mlpwo')
# Policy → the checkpoint names whose values it keeps (MaxText's `get_remat_policy`, less the names of
# projections this model does not have: fused 'qkv_proj', 'mlpwi').
_SAVED_NAMES = {
    'minimal_with_context': _MINIMAL_NAMES + ('context',),
    'minimal': _MINIMAL_NAMES,
    'save_dot_with_context_except_mlp': _QKV_NAMES + ('context', 'out_proj'),
    'save_dot_except_mlpwi': _QKV_NAMES + ('out_proj', 'mlpwo'),
    'save_dot_except_mlp': _QKV_NAMES + ('out_proj',),
    'save_qkv_proj': _QKV_NAMES,
    'save_out_proj': ('out_proj',),
}
_OFFLOADED_NAMES = {'minimal_offloaded': _MINIMAL_NAMES, 'qkv_proj_offloaded': _QKV_NAMES}
REMAT_POLICIES = fields.REMAT_POLICIES  # The names (config.validate checks them); fastest (most memory) first.
assert REMAT_POLICIES == ('none',) + tuple(_SAVED_NAMES) + ('full',) + tuple(_OFFLOADED_NAMES), 'remat tables'


def check_policy(name: str) -> None:
  """Raises InputError unless `name` is one of `REMAT_POLICIES`."""
  if name not in REMAT_POLICIES:
    raise InputError(f"config field 'model.remat' is {name!r}; expected one of {', '.join(REMAT_POLICIES)}")


def remat_policy(name: str):
  """The `jax.checkpoint` policy of a `REMAT_POLICIES` name; None for 'full' (save nothing) and 'none'."""
  check_policy(name)
  import jax  # pylint: disable=import-outside-toplevel
  if name in _SAVED_NAMES:
    return jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES[name])
  if name in _OFFLOADED_NAMES:
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(_OFFLOADED_NAMES[name]),
        offload_src='device', offload_dst='pinned_host')
  return None  # 'none' and 'full'.
