"""The sensor signal, the forecaster's training command, and the shipped forecaster's quality report
(recomputed from the shipped file: the README's numbers come from it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellstream.model import forecast_quality, forecaster
from cellstream.model.signal import SIGNAL, make_streams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter
ARTIFACTS = Path(__file__).resolve().parents[2] / "model" / "artifacts"
SHIPPED = ARTIFACTS / "cellstream-sensor.onnx"


def test_signal_regimes_last_their_span_and_the_noise_hides_the_level():
    streams = make_streams(np.random.default_rng(0), 8, 3000, first_switch=100)
    for regime in streams.regime:
        switches = np.flatnonzero(np.diff(regime)) + 1
        assert switches[0] == 100
        spans = np.diff(switches)
        assert spans.min() >= SIGNAL.min_regime and spans.max() <= SIGNAL.max_regime
    noise = streams.readings - streams.clean
    assert abs(noise.std() - SIGNAL.noise) < 0.02
    wave = streams.clean - np.asarray(SIGNAL.levels)[streams.regime]  # the periodic part, around the level
    period = int(SIGNAL.period)
    np.testing.assert_allclose(wave[:, period:], wave[:, :-period], atol=1e-5)
    assert np.abs(wave).max() == pytest.approx(SIGNAL.amplitude, abs=0.01)


@pytest.mark.timeout(300)
def test_training_command_trains_exports_and_reports(tmp_path, capsys):
    out, quality = tmp_path / "sensor.onnx", tmp_path / "sensor.quality.json"
    assert forecaster.main(["--steps", "40", "--out", str(out), "--quality", str(quality)]) == 0
    report = json.loads(quality.read_text())
    assert report["training"]["steps"] == 40 and report["parity"]["onnxruntime_to_torch"] < 1e-4
    assert set(report["forecast_rmse"]) == {"carried", "reset every 16", "persistence (last reading)",
                                            "noise floor (the clean value)"}
    assert "readings since a reset" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_shipped_quality_report_is_what_the_shipped_file_measures():
    shipped = json.loads((ARTIFACTS / "cellstream-sensor.quality.json").read_text())
    measured = forecast_quality.measure(SHIPPED)
    for table in ("forecast_rmse", "after_a_reset"):
        for row, values in shipped[table].items():
            for key, value in values.items():
                assert measured[table][row][key] == pytest.approx(value, rel=1e-4), (table, row, key)
    rmse = measured["forecast_rmse"]
    # The state is worth keeping: the carried forecast is far closer to the clean signal than one reset every
    # period, or the last reading; and within 3% of the noise floor on the next reading.
    assert rmse["carried"]["to_clean_value"] < 0.5 * rmse["reset every 16"]["to_clean_value"]
    assert rmse["carried"]["to_clean_value"] < 0.3 * rmse["persistence (last reading)"]["to_clean_value"]
    assert rmse["carried"]["to_next_reading"] < 1.03 * rmse["noise floor (the clean value)"]["to_next_reading"]
