"""Export a model with the edits merged into its weights, and the raw per-layer deltas.

    python examples/05_export_merged.py out/pack-sports
"""

import argparse
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_adapter import EditPack

parser = argparse.ArgumentParser()
parser.add_argument("pack")
parser.add_argument("--base", default="out/base")
parser.add_argument("--out", default="out/merged")
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.base).eval()
pack = EditPack.from_pretrained(args.pack)

report = pack.merge(model)  # refuses NaN/inf, warns if a bf16/fp16 merge would round the edits away
print(f"merged into {report.dtype}: {report.delta_rel_error:.2%} of the delta lost to rounding, "
      f"{report.restore_bytes} bytes kept for an exact unmerge")
model.save_pretrained(args.out)  # a plain checkpoint: no adapter, no memit_adapter needed to use it
AutoTokenizer.from_pretrained(args.base).save_pretrained(args.out)
pack.unmerge(model)

# the raw deltas, dense (d_out, d_in) per edited module, for other tools
raw = {name: d.weight_delta().contiguous() for name, d in pack.deltas.items()}
save_file(raw, str(Path(args.out) / "deltas.safetensors"), metadata={"layout": "(d_out, d_in)"})
print(f"wrote {args.out} and {args.out}/deltas.safetensors ({len(raw)} modules)")
