"""Fork safety: workers forked after a tokenizer is loaded (and used) encode instead of hanging.

torch's CPU kernels run on a GNU OpenMP thread team that a forked child does not inherit; its first
parallel kernel would wait for those threads forever. Each scenario runs in a fresh interpreter
with a timeout, so a hang fails the test instead of stalling the suite.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import numpy as np, torch
from audiotok import AudioTokenizer
tok = AudioTokenizer.from_pretrained()
audio = (0.1 * np.random.default_rng(0).standard_normal((2, 24000))).astype(np.float32)
parent = tok.encode(list(audio), 24000).codes  # the parent has run parallel kernels
"""

SCENARIOS = {
    "os.fork": """
import os
pid = os.fork()
if pid == 0:
    os._exit(0 if torch.equal(tok.encode(list(audio), 24000).codes, parent) else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
""",
    "Dataset.map(num_proc=2)": """
import datasets
ds = datasets.Dataset.from_dict({"audio": [{"array": a, "sampling_rate": 24000} for a in audio]})
out = ds.map(lambda batch: {"codes": tok.encode(batch["audio"]).codes.tolist()}, batched=True, batch_size=1,
             num_proc=2)
assert torch.equal(torch.tensor(out["codes"]), parent)
""",
    "DataLoader fork worker": """
class Codes(torch.utils.data.Dataset):
    def __len__(self):
        return 2
    def __getitem__(self, i):
        return tok.encode(audio[i], 24000).codes[0]
loader = torch.utils.data.DataLoader(Codes(), batch_size=2, num_workers=1, multiprocessing_context="fork")
assert torch.equal(next(iter(loader)), parent)
""",
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_forked_workers_encode_after_loading(scenario):
    code = textwrap.dedent(SETUP) + textwrap.dedent(SCENARIOS[scenario])
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    try:
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: forked worker hung")
    assert result.returncode == 0, result.stderr[-3000:]
