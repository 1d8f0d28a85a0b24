"""A real model on the job's input: VADER sentiment (vaderSentiment, Hutto & Gilbert, ICWSM 2014), whose lexicon
ships inside the PyPI package, so nothing is downloaded at run time.

Reads /workspace/input.json: {"text": "..."} or {"texts": ["...", ...]}; writes /workspace/output.json with one
prediction per text (label, compound score in [-1, 1], the positive/neutral/negative shares), the model, the
device and the timings. VADER is a lexicon-and-rules model: it runs on the CPU. A job that was given GPUs says
which (NVIDIA_VISIBLE_DEVICES, as the agent pins them) and that this model does not use them.
"""

import json
import os
import time
from importlib.metadata import version
from pathlib import Path

started = time.perf_counter()
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: E402

analyzer = SentimentIntensityAnalyzer()
loaded = time.perf_counter()

WORKSPACE = Path("/workspace")
job_input = json.loads((WORKSPACE / "input.json").read_text() or "null") or {}
texts = job_input.get("texts") or [job_input.get("text", "")]
if not all(isinstance(text, str) for text in texts):
    raise SystemExit('input.json must be {"text": "..."} or {"texts": ["...", ...]}')


def label(compound: float) -> str:
    # The thresholds VADER's authors recommend (README of vaderSentiment).
    return "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"


predictions = []
for text in texts:
    scores = analyzer.polarity_scores(text)
    predictions.append({"text": text, "label": label(scores["compound"]), "compound": scores["compound"],
                        "positive": scores["pos"], "neutral": scores["neu"], "negative": scores["neg"]})
done = time.perf_counter()

visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "")
gpus = [g for g in visible.split(",") if g and g not in ("void", "none")]
result = {
    "predictions": predictions,
    "model": f"VADER (vaderSentiment {version('vaderSentiment')})",
    "device": "cpu",
    "gpus_given": gpus,
    "gpu_note": ("given GPU(s) " + ", ".join(gpus) + "; VADER is a lexicon model and runs on the CPU") if gpus
    else "no GPU given",
    "timing_ms": {"load": round(1000 * (loaded - started), 2), "predict": round(1000 * (done - loaded), 2)},
}
(WORKSPACE / "output.json").write_text(json.dumps(result))
print(f"{len(predictions)} prediction(s) in {result['timing_ms']['predict']} ms")
