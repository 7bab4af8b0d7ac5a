"""Attributes beyond the category (pipeline/attributes.py, pipeline/inference/attributes.py, db/attributes.py):
model files that say which attribute they predict, jobs of several models, catalog_attributes and the contract
views, re-categorisation by an attribute model's version.

The end-to-end test trains two real models on real footwear catalogue photos (../shared): the category
(Boot/Sandal/Shoe) and a relabelling of the same folders, toe = open_toe (Sandal) or closed (Boot, Shoe), then sorts
photos neither saw with both, embedded and as stored batches, and re-sorts the catalog's toe alone.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from db.catalog import get_item, iter_items
from db.jobs import get_batch
from db.migrate import upgrade
from db.session import dispose_engines, session_scope
from pipeline.attributes import job_models
from pipeline.errors import ConfigError, ModelFileError
from pipeline.jobs import run_batch
from pipeline.models.meta import load_model_meta
from pipeline.models.modelfile import ModelFile, load_model_file, save_model_file
from pipeline.models.registry import create_model
from pipeline.settings import Settings, build_settings, get_settings
from pipeline.sorting import close_predictors, sort_source, submit_job
from tests.images import EXAMPLES, FOOTWEAR_TAR, MOBILENET_WEIGHTS, example_files
from worker.cli import main

NO_FOOTWEAR = "../shared footwear photos or ImageNet weights not present (a user's clone)"
TOE = {"Boot": "closed", "Sandal": "open_toe", "Shoe": "closed"}  # the relabelling, by category folder
# A linear probe on ImageNet features: seconds a model here (the custom CNN from scratch needs far more photos)
FAST = {"arch": "mobilenet_v2", "weights": str(MOBILENET_WEIGHTS), "freeze_backbone": True, "epochs": 3,
        "batch_size": 32, "lr": 1e-2, "image_size": (64, 64), "backgrounds": 0.0, "patience": 0, "amp": False,
        "shift_calibration": False, "open_set_tpr": 0.0}


def _model(path: Path, *, attribute: str = "category", classes: tuple[str, ...] = ("a", "b"), in_chans: int = 1,
           size: tuple[int, int] = (28, 28)) -> str:
    """A model file of random weights (the custom CNN) predicting ``attribute``."""
    net = create_model("invsort_cnn", num_classes=len(classes), in_chans=in_chans)
    save_model_file(ModelFile(arch="invsort_cnn", class_names=list(classes), in_chans=in_chans, input_size=size,
                              mean=(0.5,) * in_chans, std=(0.25,) * in_chans, state_dict=net.state_dict(),
                              attribute=attribute), path)
    return str(path)


# --- model files and a job's models -------------------------------------------------------------------------------


def test_a_model_file_says_its_attribute_and_old_files_predict_the_category(tmp_path):
    toe = _model(tmp_path / "toe.pt", attribute="toe", classes=("closed", "open_toe"))
    assert load_model_file(toe).attribute == "toe" and load_model_meta(toe).attribute == "toe"
    assert load_model_file("bundled:fashion_mnist_cnn").attribute == "category"
    assert load_model_meta("bundled:fashion_mnist_cnn").attribute == "category"
    with pytest.raises(ModelFileError, match="attribute 'Toe Shape' is not a valid name: 1..64 characters of a-z"):
        _model(tmp_path / "bad.pt", attribute="Toe Shape")


def test_a_jobs_models_are_checked_before_anything_runs(tmp_path):
    bundled = "bundled:fashion_mnist_cnn"
    toe = _model(tmp_path / "toe.pt", attribute="toe", classes=("closed", "open_toe"))
    other_category = _model(tmp_path / "cat.pt")
    models = job_models([toe, bundled], default=bundled)
    assert models.category_spec == bundled and [(m.attribute, m.path) for m in models.attributes] == [("toe", toe)]
    assert models.attributes[0].version == load_model_meta(toe).version
    assert job_models([], default=bundled).attributes == []
    with pytest.raises(ConfigError, match=r"both predict 'category': a job takes one model per attribute"):
        job_models([bundled, other_category], default=bundled)
    with pytest.raises(ConfigError, match=r"no model predicts the category \(.*toe.pt predicts 'toe'\)"):
        job_models([toe], default=bundled)
    with pytest.raises(ConfigError, match="named twice"):
        job_models([bundled, toe, toe], default=bundled)
    colour = _model(tmp_path / "colour.pt", attribute="material", in_chans=3)
    with pytest.raises(ConfigError, match="different channels .*all be grayscale or all colour"):
        job_models([bundled, colour], default=bundled)


def test_configured_attribute_models_join_every_job_and_a_jobs_own_model_wins(tmp_path, monkeypatch):
    bundled = "bundled:fashion_mnist_cnn"
    toe = _model(tmp_path / "toe.pt", attribute="toe", classes=("closed", "open_toe"))
    toe2 = _model(tmp_path / "toe2.pt", attribute="toe", classes=("closed", "open_toe"))
    material = _model(tmp_path / "material.pt", attribute="material", classes=("leather", "textile"))
    models = job_models([], default=bundled, configured=[toe, material])
    assert [(m.attribute, m.path) for m in models.attributes] == [("toe", toe), ("material", material)]
    models = job_models([bundled, toe2], default=bundled, configured=[toe, material])  # the job's toe model wins
    assert [(m.attribute, m.path) for m in models.attributes] == [("toe", toe2), ("material", material)]
    assert job_models([bundled, toe], default=bundled, configured=[toe]).attributes[0].path == toe  # named twice
    with pytest.raises(ConfigError, match="INVSORT_ATTRIBUTE_MODELS names .*toe.pt and .*toe2.pt, which both "
                                          "predict 'toe': list one model per attribute"):
        job_models([], default=bundled, configured=[toe, toe2])
    with pytest.raises(ConfigError, match="INVSORT_ATTRIBUTE_MODELS names bundled:fashion_mnist_cnn, which predicts "
                                          "'category'"):
        job_models([], default=_model(tmp_path / "cat.pt"), configured=[bundled])

    # the setting: a list separated by ',' (a model twice is refused, saying what is valid)
    monkeypatch.setenv("INVSORT_ATTRIBUTE_MODELS", f"{toe}, {material}")
    assert build_settings().attribute_models == [toe, material]
    monkeypatch.setenv("INVSORT_ATTRIBUTE_MODELS", f"{toe},{toe}")
    with pytest.raises(ConfigError, match="INVSORT_ATTRIBUTE_MODELS names a model twice"):
        build_settings()
    monkeypatch.delenv("INVSORT_ATTRIBUTE_MODELS")

    # a sort that names no model, a stored job and a re-categorisation all run the configured toe model
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    settings = Settings(database_url=url, local_roots=[EXAMPLES], attribute_models=[toe])
    outcome = sort_source(str(EXAMPLES), settings=settings, limit=4)
    version = load_model_meta(toe).version
    with session_scope(url) as session:
        got = session.execute(text("SELECT attribute, model_version, job_id FROM catalog_attributes")).all()
    assert len(got) == 4 and set(got) == {("toe", version, outcome.job_id)}
    job_id, items, _ = submit_job(str(EXAMPLES), settings=settings, model_spec=bundled, limit=2,
                                  enqueue=lambda *task: None)
    with session_scope(url) as session:
        stored = session.execute(text("SELECT attribute_models FROM sorting_jobs WHERE id = :j"),
                                 {"j": job_id}).scalar_one()
    assert items == 2 and [m["path"] for m in json.loads(stored)] == [toe]

    from pipeline.recategorize import recategorize

    two = Settings(database_url=url, local_roots=[EXAMPLES], attribute_models=[toe, material])
    result = recategorize(two)  # the rows lack a material value: re-sorted for it, by the configured models
    assert result.items == 4, result
    with session_scope(url) as session:
        attrs = session.execute(text("SELECT attribute, count(*) FROM catalog_attributes GROUP BY attribute")).all()
    assert dict(attrs) == {"material": 4, "toe": 4}
    assert recategorize(two).items == 0  # nothing lacks either: a second run re-sorts nothing

    # the Models page shows them (and a configured file that cannot be read, with why)
    from fastapi.testclient import TestClient

    from worker.web.app import create_app

    gone = str(tmp_path / "gone.pt")
    with TestClient(create_app(Settings(database_url=url, attribute_models=[toe, gone]))) as client:
        page = client.get("/models").text
    assert f'<tr data-attribute="toe"><td>toe</td><td><code>{toe}</code></td><td><code>{version}</code></td>' \
           "<td>closed, open_toe</td></tr>" in page
    assert f"<code>{gone}</code></td><td colspan=\"2\">cannot be read: FileNotFoundError" in page


def test_a_queued_recategorization_with_a_toe_model_alone_is_refused_before_anything_is_queued(tmp_path):
    from pipeline.recategorize import recategorize

    toe = _model(tmp_path / "toe.pt", attribute="toe", classes=("closed", "open_toe"))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    queued: list = []
    with pytest.raises(ConfigError, match="no model predicts the category"):
        recategorize(Settings(database_url=url), model_spec=toe, enqueue=lambda *task: queued.append(task))
    assert queued == []


def test_the_cli_refuses_a_job_without_a_category_model_and_writes_nothing(tmp_path):
    toe = _model(tmp_path / "toe.pt", attribute="toe", classes=("closed", "open_toe"))
    db = tmp_path / "c.db"
    out = CliRunner().invoke(main, ["sort", str(EXAMPLES), "--model", toe, "--db", f"sqlite:///{db}",
                                    "--no-progress"])
    assert out.exit_code == 1 and "no model predicts the category" in out.output
    with session_scope(f"sqlite:///{db}") as session:
        assert session.execute(text("SELECT count(*) FROM sorting_jobs")).scalar_one() == 0


def test_an_attribute_model_of_another_input_size_gets_the_batch_resized(tmp_path, monkeypatch):
    # the bundled model takes 28x28 grayscale; a toe model of 40x32 gets every photo too, resized from the batch
    toe = _model(tmp_path / "toe.pt", attribute="toe", classes=("closed", "open_toe"), size=(40, 32))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    settings = Settings(database_url=url, local_roots=[EXAMPLES], review_threshold=0.0)
    outcome = sort_source(str(EXAMPLES), settings=settings, model_spec="bundled:fashion_mnist_cnn",
                          more_models=[toe])
    with session_scope(url) as session:
        rows = list(iter_items(session=session, job_id=outcome.job_id))
        got = session.execute(text("SELECT attribute, value, status, model_version FROM catalog_attributes")).all()
    n = len(example_files())
    assert len(rows) == outcome.summary.images == n and all(r.status == "sorted" for r in rows)
    assert len(got) == n and {(a, s, v) for a, _, s, v in got} == {("toe", "sorted", load_model_meta(toe).version)}
    assert {value for _, value, _, _ in got} <= {"closed", "open_toe"}
    # INVSORT_REVIEW_THRESHOLD is the category model's: the toe model kept its own (0.0 in the file)

    # what reads the catalog row by row carries them: get_item (the API's items), the exports
    with session_scope(url) as session:
        toe_of = dict(session.execute(text("SELECT item_id, value FROM catalog_attributes")).all())
        assert all(get_item(session=session, item_id=r.item_id).attributes == {"toe": toe_of[r.item_id]}
                   for r in rows)
    runner = CliRunner()
    assert runner.invoke(main, ["export", "--format", "jsonl", "--db", url, "--out",
                                str(tmp_path / "c.jsonl")]).exit_code == 0
    exported = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert {e["item_id"]: e["attributes"] for e in exported} == {i: {"toe": v} for i, v in toe_of.items()}
    # the catalog page shows each item's attributes under its category
    from fastapi.testclient import TestClient

    from worker.web.app import create_app

    with TestClient(create_app(settings)) as client:
        page = client.get("/catalog?limit=200").text
    assert all(f'data-attribute="toe">toe: {v}</div>' in page for v in set(toe_of.values()))
    assert page.count('data-attribute="toe"') == n
    pq = pytest.importorskip("pyarrow.parquet")
    runner.invoke(main, ["export", "--format", "parquet", "--db", url, "--out", str(tmp_path / "c.parquet")])
    table = pq.read_table(tmp_path / "c.parquet")
    assert [dict(a) for a in table.column("attributes").to_pylist()] == [e["attributes"] for e in exported]


# --- end to end, on real footwear photos ---------------------------------------------------------------------------


def _footwear(dest: Path, per_class: int, skip: int) -> Path:
    """Photos ``skip .. skip + per_class`` of each class (in name order) from the shared tar, in category folders."""
    with tarfile.open(FOOTWEAR_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        chosen = []
        for cls in TOE:
            chosen += sorted((m for m in members if f"/{cls}/" in m.name), key=lambda m: m.name)[skip:skip + per_class]
        tar.extractall(dest, members=chosen, filter="data")
    return dest / "shoe_sandal_boot"


def _relabelled(categories: Path, dest: Path) -> Path:
    """The same photos (hard links) in toe folders: open_toe/ and closed/."""
    for folder in categories.iterdir():
        target = dest / TOE[folder.name]
        target.mkdir(parents=True, exist_ok=True)
        for photo in folder.iterdir():
            os.link(photo, target / f"{folder.name}_{photo.name}")
    return dest


@pytest.fixture(scope="module")
def footwear_models(tmp_path_factory):
    """``(shoes.pt, toe.pt, unseen photos folder)``: two models trained here on 240 photos, and 90 others."""
    if not (FOOTWEAR_TAR.exists() and MOBILENET_WEIGHTS.exists()):
        pytest.skip(NO_FOOTWEAR)
    from pipeline.training.recipe import train

    tmp = tmp_path_factory.mktemp("attributes")
    train_dir = _footwear(tmp / "train", 80, 0)
    unseen = _footwear(tmp / "unseen", 30, 80)
    train(train_dir, tmp / "shoes.pt", overrides=dict(FAST), progress=False, log_fn=lambda _: None,
          export_onnx=False)
    train(_relabelled(train_dir, tmp / "toe_train"), tmp / "toe.pt", overrides={**FAST, "attribute": "toe"},
          progress=False, log_fn=lambda _: None, export_onnx=False)
    yield tmp / "shoes.pt", tmp / "toe.pt", unseen
    close_predictors()


@pytest.fixture
def roots(footwear_models, monkeypatch):
    monkeypatch.setenv("INVSORT_LOCAL_ROOTS", str(footwear_models[2]))
    get_settings.cache_clear()
    yield footwear_models[2]
    get_settings.cache_clear()
    dispose_engines()


def _truth(uri: str) -> tuple[str, str]:
    category = Path(uri).parent.name
    return category, TOE[category]


def _catalog(url: str) -> dict[str, tuple[str, dict[str, str | None]]]:
    """``{item_id: (category, attributes)}`` from the contract view."""
    with session_scope(url) as session:
        rows = session.execute(text("SELECT item_id, category, attributes FROM catalog_current")).all()
    return {i: (c, a if isinstance(a, dict) else json.loads(a)) for i, c, a in rows}


@pytest.mark.slow
@pytest.mark.shared
def test_a_sort_with_a_toe_model_writes_each_items_toe_beside_its_category(footwear_models, roots, tmp_path):
    shoes, toe, unseen = footwear_models
    assert load_model_meta(str(toe)).attribute == "toe" and load_model_meta(str(toe)).class_names == [
        "closed", "open_toe"]
    url = f"sqlite:///{tmp_path / 'c.db'}"
    out = CliRunner().invoke(main, ["sort", str(unseen), "--model", str(toe), "--model", str(shoes), "--db", url,
                                    "--no-progress"])
    assert out.exit_code == 0, out.output
    current = _catalog(url)
    assert len(current) == 90
    toe_right = sum(attrs["toe"] == _truth(item)[1] for item, (_, attrs) in current.items())
    category_right = sum(category == _truth(item)[0] for item, (category, _) in current.items())
    print(f"unseen photos: toe top-1 {toe_right / 90:.3f}, category top-1 {category_right / 90:.3f}")
    assert toe_right / 90 >= 0.8, "the toe model learnt the relabelling (a third are open-toe: 0.67 by guessing)"
    with session_scope(url) as session:
        job = session.execute(text("SELECT model_path, attribute_models FROM sorting_jobs")).one()
        attrs = session.execute(text("SELECT count(*), count(DISTINCT model_version) FROM "
                                     "catalog_current_attributes WHERE attribute = 'toe'")).one()
    assert job[0] == str(shoes)  # the category model is the job's model, whatever the order given
    stored = job[1] if isinstance(job[1], list) else json.loads(job[1])
    assert stored == [{"attribute": "toe", "path": str(toe), "name": f"mobilenet_v2:{toe.stem}",
                       "version": load_model_meta(str(toe)).version}]
    assert tuple(attrs) == (90, 1)

    shown = CliRunner().invoke(main, ["results", "--db", url, "--limit", "0", "--csv"])
    header, *lines = shown.output.splitlines()
    assert header.endswith(",toe") and len(lines) == 90


@pytest.mark.slow
@pytest.mark.shared
def test_stored_batches_run_by_workers_write_the_attributes_of_their_job(footwear_models, roots, tmp_path):
    shoes, toe, unseen = footwear_models
    url = f"sqlite:///{tmp_path / 'q.db'}"
    upgrade(url)
    settings = Settings(database_url=url, local_roots=[unseen], items_per_task=40)
    queued: list[tuple[str, int]] = []
    job_id, total, batches = submit_job(str(unseen), settings=settings, model_spec=str(shoes),
                                        more_models=[str(toe)], enqueue=lambda j, b, _t: queued.append((j, b)))
    assert (total, batches) == (90, 3)
    with session_scope(url) as session:
        assert get_batch(session=session, job_id=job_id, batch_no=0).attribute_models[0]["attribute"] == "toe"
    for j, b in queued:
        run_batch(j, b, settings=settings)
    current = _catalog(url)
    assert len(current) == 90 and all(set(attrs) == {"toe"} for _, attrs in current.values())


@pytest.mark.slow
@pytest.mark.shared
def test_recategorize_with_a_new_toe_model_resorts_only_what_lacks_its_toe(footwear_models, roots, tmp_path):
    shoes, toe, unseen = footwear_models
    url = f"sqlite:///{tmp_path / 'r.db'}"
    runner = CliRunner()
    assert runner.invoke(main, ["sort", str(unseen), "--model", str(shoes), "--db", url,
                                "--no-progress"]).exit_code == 0
    assert all(attrs == {} for _, attrs in _catalog(url).values())

    dry = runner.invoke(main, ["recategorize", "--model", str(shoes), "--model", str(toe), "--db", url, "--dry-run"])
    assert dry.exit_code == 0 and "90 items" in dry.output, dry.output
    report = tmp_path / "r.csv"
    run = runner.invoke(main, ["recategorize", "--model", str(shoes), "--model", str(toe), "--db", url,
                               "--report", str(report), "--no-progress"])
    assert run.exit_code == 0, run.output
    current = _catalog(url)
    assert all(set(attrs) == {"toe"} for _, attrs in current.values())
    lines = report.read_text().splitlines()
    assert sum(int(line.rsplit(",", 1)[1]) for line in lines[1:]) == 90  # every item re-sorted, categories unchanged
    again = runner.invoke(main, ["recategorize", "--model", str(shoes), "--model", str(toe), "--db", url,
                                 "--report", str(report), "--no-progress"])
    assert again.exit_code == 0 and report.read_text().splitlines() == ["from_category,to_category,items"]


def test_a_lean_sort_runs_the_attribute_models_exports_without_torch(tmp_path):
    # INVSORT_RUNTIME=onnxruntime: both models run from their ONNX exports, in a process where torch cannot load
    from pipeline.models.runtimes import export_beside
    from tests.test_lean import child

    toe = _model(tmp_path / "toe.pt", attribute="toe", classes=("closed", "open_toe"), size=(40, 32))
    assert export_beside(load_model_file(toe), toe, lambda _: None) == tmp_path / "toe.onnx"
    url = f"sqlite:///{tmp_path / 'lean.db'}"
    got = child(f"""
        import json, sys
        from click.testing import CliRunner
        from worker.cli import main
        result = CliRunner().invoke(main, ["sort", {str(EXAMPLES)!r}, "--model", "bundled:fashion_mnist_cnn",
                                           "--model", {toe!r}, "--db", {url!r}, "--no-progress"])
        print(json.dumps({{"torch": sys.modules.get("torch") is not None, "code": result.exit_code,
                          "output": result.output}}))
    """, {"INVSORT_RUNTIME": "onnxruntime", "INVSORT_RUNTIME_CACHE_DIR": str(tmp_path / "cache")}, no_torch=True)
    assert got["code"] == 0 and not got["torch"], got["output"]
    with session_scope(url) as session:
        got = session.execute(text("SELECT count(*), count(DISTINCT model_version) FROM catalog_attributes "
                                   "WHERE attribute = 'toe' AND value IN ('closed', 'open_toe')")).one()
    dispose_engines(url)
    assert tuple(got) == (len(example_files()), 1)
