"""How close the served gates are to the gate equations in float64 (`python -m cellstream.bench.gate_precision`).

The server computes a request's gates with the model's glass-box graph (onnxruntime, float32) from the state the
fast graph carried to the request, so over a conversation fed in pieces they drift from the exact values as
float32 rounding accumulates through the trained memory. This runs the shipped chat model's engine as the
server does (a request's rows batched, the state between requests from the fast graph) on held-out
conversations of UTF-8 bytes, English and French, fed in the largest requests with gates (max_gate_steps), in
random pieces, and byte by byte, and prints
the largest scaled error (cellstream.model.parity.scaled_max_diff) of each gate against the NumPy reference in
float64 from zero state, and where it was; beside them, the same for the state the fast graph carries between
requests (the gates' starting point): float32's own drift. docs/API.md states the bound these figures support.
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from cellstream.model import corpus, glassbox
from cellstream.model.parity import scaled_max_diff
from cellstream.service.config import Settings
from cellstream.service.engine import Engine
from cellstream.service.gates import GATE_NAMES

MODEL = Path(__file__).resolve().parents[1] / "model" / "artifacts" / "cellstream-chat.onnx"
MAX_GATE_STEPS = Settings.model_fields["max_gate_steps"].default  # the most bytes one request with gates may have
BATCH = 4  # requests run together, as the batcher runs them
STATE = "state carried (the fast graph's h, C)"


@dataclass
class Worst:
    error: float = 0.0
    where: str = "-"

    def note(self, error: float, where: str) -> None:
        if error > self.error:
            self.error, self.where = error, where


def dialogues(count: int, length: int, seed: int) -> list[bytes]:
    """Held-out dialogues, half in French, each cut to `length` bytes (a cut may split a character: bytes are
    what the model reads)."""
    rng = random.Random(seed)
    texts = []
    while len(texts) < count:
        language = "fr" if len(texts) % 2 else "en"
        text = b""
        while len(text) < length:  # conversations longer than one dialogue go on with the next
            text += corpus.make_dialogue(rng, heldout=True, language=language).text.encode()
        texts.append(text[:length])
    return texts


def splits(rng: random.Random, length: int) -> dict[str, list[int]]:
    """Request boundaries: as few requests as max_gate_steps allows, random pieces, and byte by byte."""
    cuts = sorted(rng.sample(range(1, length), rng.randint(length // MAX_GATE_STEPS, 12 + length // MAX_GATE_STEPS)))
    pieces, start = [0], 0
    for cut in [*cuts, length]:  # no piece longer than one request with gates may be
        while cut - start > MAX_GATE_STEPS:
            start += MAX_GATE_STEPS
            pieces.append(start)
        pieces.append(cut)
        start = cut
    return {"whole": [*range(0, length, MAX_GATE_STEPS), length], "pieces": pieces,
            "byte by byte": list(range(length + 1))}


def served_gates(engine: Engine, x: np.ndarray, bounds: list[int]
                 ) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Every step's gates (B, T, 6, L, H), each request's from the state the fast graph carried to it; and that
    state after each request: (its last step, h, c), each (L, B, H)."""
    spec = engine.spec
    h = c = np.zeros((spec.num_layers, x.shape[0], spec.hidden_size), np.float32)
    parts, states = [], []
    for start, stop in itertools.pairwise(bounds):
        _, h, c, gates = engine.run_with_gates(x[:, start:stop], h, c, list(range(x.shape[0])))
        parts.append(gates)
        states.append((stop - 1, h, c))
    return np.concatenate(parts, axis=1), states


def measure(cases: int, length: int, seed: int) -> tuple[dict[str, Worst], int]:
    engine = Engine(MODEL, intra_op_threads=1)
    reference, _ = glassbox.reference_from_graph(onnx.load(str(MODEL)))
    exact = glassbox.in_float64(reference)
    worst = {name: Worst() for name in (*GATE_NAMES, STATE)}
    rng = random.Random(seed)
    texts = dialogues(cases * BATCH, length, seed)
    for case in range(cases):
        rows = texts[case * BATCH:(case + 1) * BATCH]
        x = np.array([list(row) for row in rows], np.int64)  # (B, T)
        zeros = np.zeros((len(exact.layers), len(rows), exact.layers[0].W_f.shape[0]))
        want = glassbox.reference_gates(exact, x, zeros, zeros)  # name -> (T, L, B, H), float64
        for split, bounds in splits(rng, length).items():
            got, states = served_gates(engine, x, bounds)  # (B, T, 6, L, H)
            for step, h, c in states:  # what the gates of the next request start from
                drift = max(scaled_max_diff(h, want["hidden"][step]), scaled_max_diff(c, want["cell"][step]))
                worst[STATE].note(drift, f"{split}, after step {step}")
            for k, name in enumerate(GATE_NAMES):
                gate = got[:, :, k].transpose(1, 2, 0, 3)  # (T, L, B, H)
                errors = np.abs(gate - want[name]) / np.maximum(1.0, np.abs(want[name]))
                step, layer, row, _ = np.unravel_index(int(errors.argmax()), errors.shape)
                worst[name].note(scaled_max_diff(gate, want[name]),
                                 f"{split}, text {case * BATCH + row}, layer {layer}, step {step}")
    return worst, cases * BATCH


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellstream.bench.gate_precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=25, help=f"batches of {BATCH} dialogues (default 25)")
    parser.add_argument("--bytes", type=int, default=MAX_GATE_STEPS,
                        help=f"conversation length, fed in requests of at most {MAX_GATE_STEPS} (default "
                             f"{MAX_GATE_STEPS}: one request)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    worst, texts = measure(args.cases, args.bytes, args.seed)
    print(f"{texts} held-out conversations of {args.bytes} UTF-8 bytes (English and French), {BATCH} per batch, "
          f"each fed in requests of at most {MAX_GATE_STEPS} bytes, in random pieces and byte by byte: served gates "
          "against float64 from zero state")
    print("| gate | largest scaled error | where |\n|---|---:|---|")
    for name, found in worst.items():
        print(f"| {name} | {found.error:.3g} | {found.where} |")
    print(f"\nlargest: {max(found.error for found in worst.values()):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
