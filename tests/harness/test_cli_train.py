"""`libra data synth`, `libra train` and `libra eval` from the command line, good and bad input."""
import json

import pytest
import yaml

from harness.cli import main

TINY_RUN = {
    "detector": {
        "backbone": "tiny", "num_classes": 6, "min_size": 96, "max_size": 96, "fpn_channels": 16,
        "anchor_sizes": [8, 16, 32, 64, 128], "representation_size": 32, "roi_batch_size_per_image": 32,
        "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
        "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 30,
    },
    "data": {"kind": "synthetic", "root": "data", "synthetic": {"num_train": 4, "num_val": 2, "image_size": 96}},
    "schedule": {"epochs": 1, "batch_size": 2, "lr": 0.01, "warmup_iters": 1, "lr_steps": [], "amp": False},
}


def write_config(tmp_path, mapping=TINY_RUN, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(mapping))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_data_synth_writes_a_coco_set(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--num-train", "3", "--num-val", "2",
                 "--image-size", "64", "--seed", "1"]) == 0
    annotations = json.loads((tmp_path / "s" / "annotations" / "instances_train.json").read_text())
    assert len(annotations["images"]) == 3
    assert "wrote 3 training and 2 validation images" in capsys.readouterr().out


def test_train_then_eval_then_resume_guard(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(config), "--out", str(out), "--set", "schedule.seed=3"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "bbox_mAP" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["schedule"]["seed"] == 3  # --set reached the run
    # data.root was relative: it is resolved against the config file's folder
    assert (tmp_path / "data").is_dir()

    # a second train into the same folder must not overwrite the recorded run
    assert main(["train", str(config), "--out", str(out)]) == 2
    assert "--resume" in one_error_line(capsys)
    # --resume of a finished run trains nothing more and succeeds
    assert main(["train", str(config), "--out", str(out), "--resume"]) == 0
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert evaluated["bbox_mAP"] == pytest.approx(metrics["final"]["bbox_mAP"])


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda m: m["detector"].update(bogus=1), "detector.bogus"),
        (lambda m: m["schedule"].update(epochs="ten"), "schedule.epochs"),
        (lambda m: m["detector"]["balanced_l1_loss"].update(alpha=-1) if "balanced_l1_loss" in m["detector"]
         else m["detector"].update(balanced_l1_loss={"alpha": -1}), "balanced_l1_loss.alpha"),
        (lambda m: m["data"].update(kind="coco", train_images="x", train_annotations="x.json",
                                    val_images="y", val_annotations="y.json"), "data.train_images"),
    ],
)
def test_train_bad_config_is_one_line_naming_the_key(tmp_path, capsys, mutate, expected):
    mapping = json.loads(json.dumps(TINY_RUN))
    mutate(mapping)
    config = write_config(tmp_path, mapping)
    assert main(["train", str(config), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert expected in line, line


def test_train_missing_file_and_bad_yaml_and_bad_set(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in one_error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("detector: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    assert "not valid YAML" in one_error_line(capsys)
    config = write_config(tmp_path)
    assert main(["train", str(config), "--set", "schedule.epochs"]) == 2
    assert "KEY=VALUE" in one_error_line(capsys)


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in one_error_line(capsys)


def test_every_command_has_help(capsys):
    for command in ("train", "eval", "data"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: libra" in capsys.readouterr().out


def test_eval_on_another_coco_set_needs_no_training_data(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(config), "--out", str(out)]) == 0
    other = tmp_path / "other"
    assert main(["data", "synth", "--out", str(other), "--num-train", "1", "--num-val", "2",
                 "--image-size", "96", "--seed", "5"]) == 0
    import shutil
    shutil.rmtree(tmp_path / "data")  # the checkpoint's own data is gone
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--val-images", str(other / "val"),
                 "--val-annotations", str(other / "annotations" / "instances_val.json")]) == 0
    assert "bbox_mAP" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--val-images", str(tmp_path / "nope"),
                 "--val-annotations", str(other / "annotations" / "instances_val.json")]) == 2
    assert "--val-images" in one_error_line(capsys)
