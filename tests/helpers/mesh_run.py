"""Trains the tiny model on a given mesh of simulated CPU devices; run as a script by tests/test_mesh.py.

argv: NUM_DEVICES MODEL_DIR DATA_FILE OUT_DIR MESH_JSON... (each a {"data": d, "fsdp": f, "tensor": t} object).
Writes OUT_DIR/result.json: per mesh, the per-step losses, the parameter / optimizer-state shardings and the
bytes per device.
"""

import json
import os
import sys


def main(num_devices: str, model_dir: str, data_file: str, out_dir: str, *meshes: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_num_cpu_devices', int(num_devices))
  from jaxsft import sharding  # pylint: disable=import-outside-toplevel
  from jaxsft.models import hf_config  # pylint: disable=import-outside-toplevel
  from tests.helpers import runs  # pylint: disable=import-outside-toplevel

  results = []
  for k, mesh_json in enumerate(meshes):
    mesh_cfg = json.loads(mesh_json)
    config = runs.config(model_name_or_path=model_dir, dataset_name=data_file, output_dir=os.path.join(out_dir, str(k)),
                         bf16=False, gradient_checkpointing=False, disable_tqdm=True, learning_rate=3e-3,
                         max_length=96, per_device_train_batch_size=8 // int(num_devices),
                         gradient_accumulation_steps=2, max_steps=5, logging_steps=1, assistant_only_loss=True,
                         warmup_steps=1, weight_decay=0.1, seed=0, mesh=mesh_cfg)
    runs.run(config)
    losses = runs.losses(config.output_dir)
    # The state as the trainer builds it, to check its shardings.
    mesh = sharding.make_mesh(config.mesh)
    model_dir_ = str(hf_config.resolve_model_dir(model_dir))
    model_cfg = runs.model_config(config, hf_config.read_hf_config(model_dir_))
    tx, _ = runs.make_optimizer(config, total_steps=5)
    state = runs.init_state(config, model_dir_, model_cfg, tx, mesh).state
    specs = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
      spec = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
      specs[jax.tree_util.keystr(path).removesuffix('.value')] = spec
    results.append({'mesh': mesh_cfg, 'losses': losses, 'specs': specs,
                    'param_bytes': sharding.bytes_per_device(state['params']),
                    'opt_bytes': sharding.bytes_per_device(state['opt_state'])})
  with open(os.path.join(out_dir, 'result.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
