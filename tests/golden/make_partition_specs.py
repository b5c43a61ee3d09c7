"""Regenerates tests/golden/partition_specs.json: every parameter's PartitionSpec for every model preset.

    python -m tests.golden.make_partition_specs
Review the diff: a changed spec changes how every pod job shards its weights.
"""

import json
from pathlib import Path

from leo_jax.presets import model_presets, partition_specs

if __name__ == "__main__":
    golden = {name: partition_specs(name) for name in model_presets()}
    out = Path(__file__).with_name("partition_specs.json")
    out.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({len(golden)} presets)")
