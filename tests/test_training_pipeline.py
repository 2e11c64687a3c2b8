"""The train pipeline from Python: `training_pipeline.train_bundle` writes a bundle with
its metadata; usage errors name Python parameters and come before any work."""

from __future__ import annotations

import pytest

from pixeldefend.detector import DensityDetector
from pixeldefend.errors import UsageError
from pixeldefend.training_pipeline import TrainJob, check_job, default_out, train_bundle


def test_train_bundle_from_python(tmp_path):
    job = TrainJob(data="digits", out=tmp_path / "m", preset="tiny", epochs=1,
                   max_images=200, batch_size=64, device="cpu", score_kind="bpd")
    messages: list[str] = []
    result = train_bundle(job, log=messages.append)
    assert any(m.startswith("data digits: 200 train") for m in messages)
    loaded = DensityDetector.load(tmp_path / "m", device="cpu")
    data = loaded.meta["data"]
    assert data["spec"] == "digits" and data["n_train"] == 200
    assert data["calib"] == "digits:calib" and data["n_test"] == len(result.data.test)
    assert loaded.default_kind == "bpd" and "bpd" in loaded.calibrations
    assert result.metrics["test_bits_per_dim"] > 0
    assert not job.checkpoint.exists()


@pytest.mark.parametrize("changes, param", [
    ({"preset": "huge"}, "preset"),
    ({"fpr": 1.0}, "fpr"),
    ({"score_kind": "nope"}, "score_kind"),
    ({"score_kind": "llr"}, "score_kind"),
    ({"background_preset": "huge"}, "background_preset"),
])
def test_check_job_names_the_parameter(changes, param):
    with pytest.raises(UsageError, match=f"^{param}") as info:
        check_job(TrainJob(**changes))
    assert param in (info.value.param if isinstance(info.value.param, tuple)
                     else (info.value.param,))
    assert "--" not in str(info.value)


def test_default_bundle_folder():
    assert TrainJob(data="fashion-mnist:train").bundle == default_out("fashion-mnist")


def test_recalibrate_bundle_from_python(tiny_bundle, tmp_path):
    import shutil

    from pixeldefend.training_pipeline import recalibrate_bundle

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    done = recalibrate_bundle(bundle, "digits:calib", fpr=0.1, kind="bpd", device="cpu")
    assert done.kinds == ["bpd"] and done.headline == "bpd"
    assert DensityDetector.load(bundle, device="cpu").calibrations["bpd"].fpr == 0.1
    with pytest.raises(UsageError, match="^fpr must be") as info:
        recalibrate_bundle(bundle, fpr=0.0)
    assert info.value.param == "fpr"
