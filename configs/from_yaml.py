"""Any open-r1 / TRL SFT recipe YAML, imported field by field.

What: trains what the recipe says. Its TRL `SFTConfig` and open-r1 `ScriptArguments` / `ModelConfig` fields
(flat, as open-r1's `recipes/*/sft/*.yaml`) become jaxsft's config fields of the same name; the few with another
shape are mapped (`lr_scheduler_kwargs.min_lr_rate`, `save_strategy`, `max_seq_length`, ...), GPU/torch-only and
Hub-only fields (`attn_implementation`, `use_liger_kernel`, `deepspeed`, `push_to_hub`, ...) are ignored with one
warning line each, and unknown fields are one error naming all of them. jaxsft/recipe.py (`RECIPE_FIELDS`,
`RECIPE_MAPPED`, `RECIPE_IGNORED`) holds the mapping. jaxsft-only settings (`global_batch_size`, `mesh.*`,
`model.*`) keep their defaults: set them on the command line.
Where: wherever the recipe's model fits; the batch is split over all devices (data parallel) unless `mesh.*` says
otherwise. Size it first: `python -m jaxsft.dryrun --config configs/from_yaml.py:RECIPE.yaml --topology SLICE`.
How long: as the recipe (configs/r1_distill.py estimates open-r1's OpenR1-Distill-7B on TPU).

  python -m jaxsft.train \
      --config configs/from_yaml.py:recipes/OpenR1-Distill-7B/sft/config_distill.yaml \
      --config.global_batch_size=128 --config.mesh.data=1 --config.mesh.fsdp=-1
"""

from jaxsft import recipe
from jaxsft.errors import InputError

USAGE = 'python -m jaxsft.train --config configs/from_yaml.py:RECIPE.yaml [--config.FIELD=VALUE ...]'


def get_config(path=None):
  if not path:
    raise InputError(f'configs/from_yaml.py needs the recipe YAML after a colon: {USAGE}')
  return recipe.from_recipe_yaml(path)
