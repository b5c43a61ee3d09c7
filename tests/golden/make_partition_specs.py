"""Regenerates tests/golden/partition_specs.json: every parameter's PartitionSpec for every model preset.

    python tests/golden/make_partition_specs.py
Review the diff: a changed spec changes how every pod job shards its weights.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from leo_jax.presets import model_presets, partition_specs  # noqa: E402

if __name__ == "__main__":
    golden = {name: partition_specs(name) for name in model_presets()}
    out = Path(__file__).with_name("partition_specs.json")
    out.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({len(golden)} presets)")
