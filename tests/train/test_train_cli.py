import sysconfig

from typer.testing import CliRunner

from lmsqueeze.train.cli import app


def test_train_model_smoke(tmp_path, small_tokenizer):
    from lmsqueeze.models.loading import load_model

    stdlib = sysconfig.get_paths()["stdlib"]
    out = tmp_path / "m"
    r = CliRunner().invoke(app, ["model", "--out", str(out), "--preset", "tiny", "--tokenizer", str(small_tokenizer),
                                 "--train-preset", "smoke", "--max-steps", "3", "--data", stdlib,
                                 "--max-chars", "300000", "--results", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    _, tok = load_model(out)
    assert tok is not None and (tmp_path / "r.json").exists()
    r = CliRunner().invoke(app, ["looped", "--out", str(out), "--preset", "tiny"])
    assert r.exit_code != 0
