"""Export a run to Hugging Face format and compare its features with ours (fp32 and fp64).

    python scripts/check_export.py runs/demo      # writes runs/demo-hf, prints the relative errors

Images: 64 generated scenes (seed 999) through our normalization and through the exported
CLIPImageProcessor; captions: their first caption through both tokenizers.
"""

import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from training.data.datasets import normalize
from training.data.synthetic import SyntheticScenes
from training.export import load_run


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main(run: str) -> None:
    out = run.rstrip("/") + "-hf"
    subprocess.run([sys.executable, "-m", "training.export", run, "--format", "hf", "--out", out], check=True)
    model, tok, cfg = load_run(run)
    scenes = SyntheticScenes(64, image_size=cfg.data_image_size, seed=999)
    items = [scenes[i] for i in range(len(scenes))]
    u8, texts = torch.stack([it[0] for it in items]), [it[1][0] for it in items]
    hf = CLIPModel.from_pretrained(out).eval()
    hf_tok, proc = AutoTokenizer.from_pretrained(out), CLIPImageProcessor.from_pretrained(out)
    L = cfg.data_context_length
    ids, lengths = tok.encode_batch(texts, L)
    enc = hf_tok(texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    pixels = proc(images=[u.permute(1, 2, 0).numpy() for u in u8], return_tensors="pt").pixel_values
    print(
        f"CLIPImageProcessor vs our normalization: max abs diff {float((pixels - normalize(u8)).abs().max()):.3g}"
    )
    for dtype in (torch.float32, torch.float64):
        model.to(dtype), hf.to(dtype)
        with torch.no_grad():
            ours_img, ours_txt = model.visual(normalize(u8).to(dtype)), model.text(ids, lengths=lengths)
            hf_img = _features(hf.get_image_features(pixel_values=pixels.to(dtype)))
            hf_txt = _features(hf.get_text_features(**enc))
        sim_ours = F.normalize(ours_img, dim=-1) @ F.normalize(ours_txt, dim=-1).T
        sim_hf = F.normalize(hf_img, dim=-1) @ F.normalize(hf_txt, dim=-1).T
        print(f"{dtype}: image rel err {_rel(hf_img, ours_img):.2g}, text rel err {_rel(hf_txt, ours_txt):.2g}, "
              f"similarity max abs diff {float((sim_hf - sim_ours).abs().max()):.2g}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
