"""Config: presets load, unknown keys and bad values are rejected naming the field, overrides and flags apply."""

import argparse
import dataclasses

import pytest

from dsp_fast import reference, train
from dsp_fast.config import (
    DATA_BACKENDS,
    ConfigError,
    FastConfig,
    ModelConfig,
    add_cli_args,
    apply_cli_args,
    load_config,
    preset_names,
    save_config,
)


@pytest.mark.parametrize("spelling, name", [("gta2cs.yaml", "gta2cs"), ("configs/synthia2cs.yaml", "synthia2cs")])
def test_a_preset_loads_by_file_name_or_its_old_path_from_any_folder(spelling, name, tmp_path, monkeypatch):
    """The file name and the 'configs/x.yaml' spelling of the presets before they moved into the package name the
    preset itself, from a folder without a configs/ of its own."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(spelling)
    assert cfg == load_config(name) and cfg != load_config(None)


SCRIPT_VALUES = {"dsp.lam": 0.8, "model.aspp_two_branch_bug": True, "dsp.train_mmd_projection": False,
                 "dsp.drop_target_soft_term": True, "dsp.share_first_mask": True, "dsp.paste_ignore_label": True,
                 "optim.script_param_repeats": True, "dsp.long_tail_paste": "columns", "dsp.kornia_hsv_quirk": True,
                 "data.target_size": (2048, 1024)}
"""The authors' script @8baf66e, switch by switch (docs/method.md's deviation table)."""


@pytest.mark.parametrize("paper,script", [("gta2cs", "gta2cs_script"), ("synthia2cs", "synthia2cs_script")])
def test_script_presets_set_every_switch_and_paper_presets_none(paper, script):
    def get(cfg, dotted):
        section, name = dotted.split(".")
        return getattr(getattr(cfg, section), name)

    paper_cfg, script_cfg, default = load_config(paper), load_config(script), load_config(None)
    for dotted, value in SCRIPT_VALUES.items():
        assert get(script_cfg, dotted) == value, dotted
        if dotted != "dsp.lam":  # the paper presets' lam is the paper's (0.9 GTA5, 0.8 SYNTHIA)
            assert get(paper_cfg, dotted) == get(default, dotted) != value, dotted
    assert script_cfg.dsp.long_tail_search == "counts"  # the retry loop's distribution, from counts
    # otherwise the same run: dataset, model, classes, schedule
    for dotted in ("data.source", "data.source_size", "model.arch", "model.num_classes", "dsp.long_tail_classes",
                   "optim.lr", "train.max_steps"):
        assert get(script_cfg, dotted) == get(paper_cfg, dotted), dotted
    assert paper_cfg.dsp.lam == (0.9 if paper == "gta2cs" else 0.8)


@pytest.mark.parametrize("preset", preset_names())
def test_long_tail_size_is_the_authors_or_scaled_like_it(preset):
    """The authors cut long-tail crops from the source resized to 1920x1080 (GTA5 and SYNTHIA alike): 1.5x GTA5's
    1280x720. A synthetic preset, at a smaller source size, scales it the same way, or its long-tail crops come from
    a more magnified image than the paper's."""
    cfg = load_config(preset)
    (w, h), got = cfg.data.source_size, tuple(cfg.dsp.long_tail_size)
    want = (round(1.5 * w), round(1.5 * h)) if cfg.data.source == "synthetic" else (1920, 1080)
    assert got == want, f"{preset}: dsp.long_tail_size {got} for a {w}x{h} {cfg.data.source} source"


def test_paper_settings():
    gta = load_config("gta2cs")
    assert (gta.dsp.lam, gta.model.num_classes, gta.data.source_size) == (0.9, 19, (1280, 720))
    assert gta.dsp.long_tail_classes == [12, 15, 16, 17, 18]
    syn = load_config("synthia2cs")
    assert (syn.dsp.lam, syn.model.num_classes, syn.data.source_size) == (0.8, 16, (1280, 760))


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, field", [
    ("data:\n  sauce: gta5\n", "data.sauce"),
    ("dataa:\n  source: gta5\n", "dataa"),
    ("dsp:\n  lam: 1.5\n", "dsp.lam"),
    ("dsp:\n  lam: high\n", "dsp.lam"),
    ("train:\n  max_steps: 0\n", "train.max_steps"),
    ("train:\n  max_steps: 1.5\n", "train.max_steps"),
    ("model:\n  arch: resnet9000\n", "model.arch"),
    ("data:\n  crop_size: [512]\n", "data.crop_size"),
    ("data:\n  crop_size: [2048, 2048]\n", "data.source_size"),
    ("data:\n  source: gta5\n", "data.source_root"),
    ("model:\n  num_classes: 10\n", "dsp.long_tail_classes"),
    ("dsp:\n  long_tail_search: sometimes\n", "dsp.long_tail_search"),
    ("model:\n  freeze_bn: 1\n", "model.freeze_bn"),
])
def test_bad_values_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(_write(tmp_path, "data: [unclosed\n"))


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config("synthetic", ["train.max_steps=7", "dsp.lam=0.5", "data.crop_size=[64, 64]"])
    assert (cfg.train.max_steps, cfg.dsp.lam, cfg.data.crop_size) == (7, 0.5, (64, 64))
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["max_steps=3"])
    path = str(tmp_path / "resolved.yaml")
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_fast_section_and_its_flags(tmp_path):
    with pytest.raises(ConfigError, match=r"fast\.amp"):
        load_config(None, ["fast.amp=fp64"])
    with pytest.raises(ConfigError, match=r"fast\.keep_last"):
        load_config(None, ["fast.keep_last=0"])
    cfg = load_config(_write(tmp_path, "fast:\n  keep_last: 5\n  amp: bf16\n  deterministic: true\n"))
    args = train.parse_args(["--amp", "fp32", "--no-graphs", "--resume"])
    cfg = apply_cli_args(cfg, args)
    opts = cfg.fast
    assert (opts.amp, opts.cuda_graphs, opts.keep_last, args.resume) == ("fp32", False, 5, "auto")  # preset kept
    assert (opts.channels_last, opts.deterministic) == (True, True)
    # a flag for every field, booleans both ways (a preset's true turned off, its false turned on)
    args = train.parse_args(["--no-deterministic", "--graphs", "--graph-warmup", "3", "--prepared-format", "png",
                             "--prepared-dir", "cache", "--no-channels-last", "--no-batched-student"])
    opts = apply_cli_args(cfg, args).fast
    assert (opts.deterministic, opts.cuda_graphs, opts.graph_warmup, opts.prepared_format, opts.prepared_dir,
            opts.channels_last, opts.batched_student) == (False, True, 3, "png", "cache", False, False)
    with pytest.raises(ConfigError, match=r"fast\.image_every"):
        apply_cli_args(cfg, train.parse_args(["--image-every", "-1"]))
    with pytest.raises(SystemExit):  # the field's own choices
        train.parse_args(["--prepared-format", "gif"])


def test_help_lists_every_flag_with_its_fields_docstring(capsys):
    """`python -m dsp_fast.train --help`: a flag per `fast:` field, its help the field's docstring (argparse wraps
    the lines: compared without whitespace)."""
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--amp {auto,bf16,fp16,fp32}", "--no-graphs", "--no-channels-last", "--no-batched-student",
                 "--data-backend {auto,dali,torch}", "--data-threads", "--optimizer {auto,fused,foreach,apex}",
                 "--compile {off,model,step}", "--keep-last", "--no-tensorboard", "--image-every", "--max-bad-steps",
                 "--deterministic", "--prepared-source", "--prepared-target", "--prepared-dir",
                 "--prepared-format {auto,jpeg,png}", "--graph-warmup", "--resume [PATH|auto]"):
        assert flag in out, flag
    flat = "".join(out.split())
    for f in dataclasses.fields(FastConfig):
        assert f"fast.{f.name}:" in out, f.name
    # the docstrings themselves, a few words of each field's
    for words in ("channels_last memory format", "Eager steps before the capture", "a non-finite loss or gradient",
                  "Image format of the trainer's own preparations"):
        assert "".join(words.split()) in flat, words


@pytest.mark.parametrize("flags, fields", [
    (["--optimizer", "apex", "--no-graphs", "optim.algorithm=adamw"], ("fast.optimizer", "optim.algorithm")),
    (["fast.optimizer=apex", "fast.cuda_graphs=false", "optim.algorithm=adamw"], ("fast.optimizer", "optim.algorithm")),
    (["dsp.long_tail_search=retry"], ("dsp.long_tail_search", "dsp_fast.reference")),
    (["--amp", "fp16", "--no-graphs", "optim.script_param_repeats=true"], ("optim.script_param_repeats", "fast.amp")),
    (["--optimizer", "apex", "--no-graphs", "optim.script_param_repeats=true"],
     ("optim.script_param_repeats", "fast.optimizer")),
    (["--keep-last", "0"], ("fast.keep_last",)),
])
def test_a_bad_setting_exits_2_in_one_line_naming_the_field(tmp_path, capsys, flags, fields):
    """Refused when the config is read, before any data, folder or model is made: exit 2, one line, the field."""
    args = ["--config", "synthetic", f"data.synthetic_root={tmp_path / 'unused'}", f"train.out_dir={tmp_path / 'run'}",
            "model.arch=tiny", *flags]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "config field '" in err, err
    assert all(name in err for name in fields), err
    assert not (tmp_path / "unused").exists() and not (tmp_path / "run").exists()


def test_the_retry_loop_is_a_setting_of_the_reference_trainer():
    """'retry' is a valid config (the reference trainer runs the loop); only the fast trainer refuses it."""
    cfg = load_config(None, ["dsp.long_tail_search=retry"])
    assert cfg.dsp.long_tail_search == "retry"
    with pytest.raises(ConfigError, match=r"dsp\.long_tail_search"):
        apply_cli_args(cfg, argparse.Namespace())


@pytest.mark.parametrize("text, want", [("1e-3", 1e-3), ("1e9", 1e9), ("1.0e9", 1e9), ("2.5e-3", 2.5e-3),
                                        ("3", 3.0), ("1E-4", 1e-4)])
def test_floats_as_typed(tmp_path, text, want):
    """PyYAML (YAML 1.1) reads `1e-3` and `1e9` as strings; a float field takes every spelling float() takes, on the
    command line and in a YAML file."""
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == want
    assert load_config(_write(tmp_path, f"optim:\n  lr: {text}\n")).optim.lr == want
    cfg = load_config(None, [f"optim.betas=[0.9, {text}]"] if want < 1 else [])
    assert cfg.optim.betas[1] == (want if want < 1 else 0.999)


@pytest.mark.parametrize("text", ["fast", "1e-3x", "true", "[1e-3]"])
def test_a_float_field_still_refuses_what_is_not_a_number(tmp_path, text):
    with pytest.raises(ConfigError, match=r"optim\.lr.*expected a number"):
        load_config(None, [f"optim.lr={text}"])
    with pytest.raises(ConfigError, match=r"optim\.lr.*expected a number"):
        load_config(_write(tmp_path, f"optim:\n  lr: {text}\n"))


def test_fields_the_data_source_does_not_read_are_refused(tmp_path):
    """Real roots under the synthetic source used to train on generated scenes and exit 0; now the error names the
    field and the presets that read it. The synthetic root under a real source is the mirror case."""
    for args in (["data.source_root=/data/gta5"], ["data.target_root=/data/cityscapes"]):
        with pytest.raises(ConfigError, match=r"data\.\w+_root.*not read with data.source 'synthetic'.*--config gta2cs"
                           r".*--config synthia2cs"):
            load_config("synthetic", args)
    with pytest.raises(ConfigError, match=r"data\.synthetic_root.*read only with data.source 'synthetic'.*--config "
                       r"synthetic"):
        load_config("gta2cs", ["data.synthetic_root=/tmp/syn"])
    with pytest.raises(ConfigError, match=r"data\.source_root"):
        load_config(_write(tmp_path, "data:\n  source: synthetic\n  source_root: /data/gta5\n"))
    # what the presets read stays allowed, and switching a synthetic preset to a real source keeps its (default)
    # synthetic_root without complaint
    assert load_config(None).data.source == "synthetic"
    cfg = load_config("synthetic", ["data.source=gta5", "data.source_root=/g", "data.target_root=/c"])
    assert (cfg.data.source_root, cfg.data.target_root) == ("/g", "/c")
    assert load_config("synthetic", ["data.synthetic_root=/tmp/syn"]).data.synthetic_root == "/tmp/syn"


def test_validation_reads_no_file():
    """A weights path is checked where the file is loaded (dsp_fast.models.weights), not by the config: a config
    names a file of the machine it runs on, and may be read anywhere (a run folder's, a copy on a laptop)."""
    assert ModelConfig(pretrained="/nonexistent/weights.pth").pretrained == "/nonexistent/weights.pth"
    assert load_config(None, ["model.pretrained=/nonexistent/weights.pth"]).model.pretrained


def test_a_missing_weights_file_stops_both_trainers_naming_the_field(synthetic_root, tmp_path, capsys):
    """Exit 2 before the first step, the message naming model.pretrained and the path (no traceback)."""
    missing = str(tmp_path / "nothere.pth")
    args = ["--config", "synthetic", f"data.synthetic_root={synthetic_root}", f"train.out_dir={tmp_path / 'run'}",
            "train.max_steps=2", "data.crop_size=[32,32]", "data.eval_size=[64,32]", "data.max_eval_images=2",
            "train.compare_source_only=false", "data.num_workers=0", f"model.pretrained={missing}"]
    for main in (train.main, reference.main):
        assert main(args) == 2, main
        err = capsys.readouterr().err
        assert "model.pretrained" in err and missing in err and "Traceback" not in err, err
    assert not list(tmp_path.rglob("*.pt"))  # no step was taken
    assert not (tmp_path / "run").exists()  # refused before a run folder was made


@pytest.mark.parametrize("flags, field", [(["--amp", "fp16"], "fast.amp"),
                                          (["--optimizer", "foreach"], "fast.optimizer"),
                                          (["fast.optimizer=apex"], "fast.optimizer")])
def test_a_step_graphs_cannot_capture_is_refused_unless_graphs_are_off(tmp_path, capsys, flags, field):
    """fp16 (the GradScaler) and the non-fused optimizers cannot be captured: with fast.cuda_graphs true (the
    default) they are refused, naming both fields, on every device, instead of running eagerly behind the user's
    back; --no-graphs (fast.cuda_graphs=false) takes them."""
    args = ["--config", "synthetic", f"data.synthetic_root={tmp_path / 'unused'}", *flags]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert field in err and "fast.cuda_graphs" in err and "--no-graphs" in err, err
    assert not (tmp_path / "unused").exists()  # refused before any data was generated
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    overrides = [f for f in flags if "=" in f]
    cfg = apply_cli_args(load_config(None, [*overrides, "fast.cuda_graphs=false"]),
                         parser.parse_args([f for f in flags if "=" not in f]))
    assert not cfg.fast.cuda_graphs
    FastConfig(amp="fp16", optimizer="foreach", cuda_graphs=False)  # eager: fine


def test_the_data_backends_have_one_home():
    """fast.data_backend's choices are 'auto' and the loader's own backends (torchvision: the data benchmark's)."""
    from dsp_fast.pipelines import BACKENDS

    assert DATA_BACKENDS[0] == "auto" and set(DATA_BACKENDS[1:]) <= set(BACKENDS)


def test_dacs_switches_and_the_errors_naming_them():
    """DACS's switches (dsp.template, dsp.source_mix) and the combinations they rule out, each error naming the
    field it rejects and the one it conflicts with; the gta2cs_dacs preset is DACS's code where a field exists."""
    with pytest.raises(ConfigError, match=r"'dsp\.template'"):
        load_config(None, ["dsp.template=target"])
    with pytest.raises(ConfigError, match=r"'dsp\.source_mix'.*dsp\.template 'source'"):
        load_config(None, ["dsp.template=source", "dsp.mmd_weight=0"])  # source_mix left true
    with pytest.raises(ConfigError, match=r"'dsp\.mmd_weight'.*dsp\.source_mix false"):
        load_config(None, ["dsp.source_mix=false"])  # the MMD left on
    assert load_config(None, ["dsp.num_long_tail=0"]).dsp.num_long_tail == 0
    dacs = load_config("gta2cs_dacs").dsp
    assert (dacs.template, dacs.source_mix, dacs.lam, dacs.num_long_tail, dacs.mmd_weight) == (
        "source", False, 1.0, 0, 0.0)
    assert (dacs.conf_threshold, dacs.ema_max, dacs.paste_ignore_label, dacs.jitter_strength) == (
        0.968, 0.99, True, 0.25)
    assert dacs.batches_per_step() == 2 and load_config("gta2cs").dsp.batches_per_step() == 3
    small = load_config("synthetic_dacs")
    assert {k: getattr(small.dsp, k) for k in ("template", "source_mix", "lam", "num_long_tail", "mmd_weight")} == {
        k: getattr(dacs, k) for k in ("template", "source_mix", "lam", "num_long_tail", "mmd_weight")}
