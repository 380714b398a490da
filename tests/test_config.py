"""Config parsing, start-up validation and the README/CI command contract."""

import json
import os
import re
import subprocess
import sys

import pytest

from lowlight import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["vit_magface", "r100_arcface", "r100_adaface", "r100_magface"]


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_arg_types_and_flags():
    a = config_lib.parse_arg("variant=S,smoke,steps=7,lr=0.5", variant="B", smoke=False,
                             steps=1, lr=0.1)
    assert (a.variant, a.smoke, a.steps, a.lr) == ("S", True, 7, 0.5)
    assert isinstance(a.steps, int) and isinstance(a.lr, float)


@pytest.mark.parametrize("arg,match", [
    ("varient=S", r"unknown config argument 'varient'; valid: smoke, variant"),
    ("variant", r"needs a value"),
    ("smoke=maybe", r"'smoke'.*boolean"),
])
def test_parse_arg_errors(arg, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.parse_arg(arg, variant="B", smoke=False)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "smoke", "scale=cpu", "scale=full"])
def test_every_config_builds_and_validates(name, arg):
    c = _load(name).get_config(arg)
    config_lib.validate(c, num_devices=8)
    assert c.scale in ("full", "cpu", "smoke")
    json.dumps(config_lib.to_dict(c))  # serialisable for config.json
    assert name.split("_")[1] == c.loss.name


def test_paper_b_constants_in_full_resnet_config():
    c = _load("r100_arcface").get_config("scale=full")
    # Paper B §4.1.3: SGD momentum 0.9, lr 0.1 cosine, wd 5e-4, s=64, m=0.5, batch 512, r=0.3.
    optim = (c.optim.name, c.optim.momentum, c.optim.lr, c.optim.weight_decay)
    assert optim == ("sgd", 0.9, 0.1, 5e-4)
    assert (c.loss.s, c.loss.m, c.batch_size, c.partial_fc.sample_rate) == (64.0, 0.5, 512, 0.3)
    assert c.model.name == "iresnet100"
    assert _load("r100_arcface").get_config("scale=full,depth=50").model.name == "iresnet50"


@pytest.mark.parametrize("key,value,match", [
    ("task", "segment", r"unknown task 'segment'; valid: recognition"),
    ("model.name", "resnet9000",
     r"unknown model \(config.model.name\) 'resnet9000'; valid: .*iresnet100"),
    ("loss.name", "sphereface",
     r"unknown loss .* 'sphereface'; valid: arcface, cosface, adaface, magface"),
    ("data.name", "imagenet", r"unknown dataset .* 'imagenet'; valid: synth, utkface"),
    ("batch_size", 12, r"batch_size=12 is not divisible by the 8 devices"),
])
def test_validate_names_the_key(key, value, match):
    c = _load("vit_magface").get_config("smoke")
    node = c
    *path, last = key.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(c, num_devices=8)


def test_workdir_of_a_different_config_is_refused(tmp_path):
    c = _load("vit_magface").get_config("smoke")
    config_lib.write_or_check(c, str(tmp_path))
    config_lib.write_or_check(c, str(tmp_path))  # same config: fine
    c.total_steps = 99  # a process setting: fine
    config_lib.write_or_check(c, str(tmp_path))
    c.loss.s = 32.0
    with pytest.raises(config_lib.ConfigError, match=r"different config \(differs in: loss.s\)"):
        config_lib.write_or_check(c, str(tmp_path))
    c.resume = "force"
    config_lib.write_or_check(c, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["loss"]["s"] == 32.0


def _main(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "lowlight.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_main_unknown_config_key_fails_in_one_line(tmp_path):
    r = _main(["--config=configs/vit_magface.py:smoke", f"--workdir={tmp_path}",
               "--config.los.name=arcface"], tmp_path)
    assert r.returncode != 0
    assert "los" in r.stderr


def test_main_bad_model_name_fails_cleanly(tmp_path):
    r = _main(["--config=configs/vit_magface.py:smoke", f"--workdir={tmp_path}",
               "--config.model.name=vit_zz"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lowlight: error: unknown model") and "vit_t" in last
    assert "Traceback" not in r.stderr


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command_verbatim():
    install_and_run, install_and_test = _readme_commands()
    assert "lowlight.main --config=configs/vit_magface.py" in install_and_run
    assert "pytest" in install_and_test
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert install_and_test in ci
