"""The models of a job: one that predicts the item's category (``catalog_items``) and any number that predict other
attributes (``toe``, ``material``, style: ``catalog_attributes``), each model file saying which it predicts
(its ``attribute``, :func:`pipeline.models.meta.checked_attribute`; ``invsort train --attribute NAME``).

:func:`job_models` checks a job's model files without torch (``invsort submit`` stays lean) and pins each one's
version; the job row keeps the category model in ``model_path`` / ``model_version`` and the others in
``attribute_models`` (:meth:`AttributeModel.to_json`). The photos are fetched and decoded once per batch for all of
them (:class:`pipeline.inference.attributes.WithAttributes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.models.meta import CATEGORY, ModelMeta, load_model_meta

if TYPE_CHECKING:
    from pipeline.io.storage import ObjectReader


@dataclass(frozen=True, slots=True)
class AttributeModel:
    """One model of a job that predicts an attribute other than the category: the attribute, the model file's
    spec (path, ``s3://`` URI or ``bundled:NAME``), its name and the version the job pinned (12 hex chars)."""

    attribute: str
    path: str
    name: str
    version: str

    def to_json(self) -> dict[str, str]:
        """What ``sorting_jobs.attribute_models`` holds for it."""
        return {"attribute": self.attribute, "path": self.path, "name": self.name, "version": self.version}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AttributeModel:
        return cls(str(obj["attribute"]), str(obj["path"]), str(obj["name"]), str(obj["version"]))


def attribute_models_of(stored: Sequence[dict[str, Any]] | None) -> list[AttributeModel]:
    """A job row's ``attribute_models`` (null for a job without any, or from before they existed)."""
    return [AttributeModel.from_json(m) for m in stored or ()]


@dataclass(frozen=True, slots=True)
class JobModels:
    """A job's models, checked: the category model (its spec and fields) and the others in the order given."""

    category_spec: str
    category: ModelMeta
    attributes: list[AttributeModel]


def job_models(specs: Sequence[str], *, default: str, configured: Sequence[str] = (),
               reader: ObjectReader | None = None) -> JobModels:
    """Check the model files a job names (``--model`` given once or more; none: ``default``) and the configured
    models of other attributes, reading each one's fields and version without torch.

    Exactly one must predict ``category``; the others must predict distinct attributes and take photos with as many
    channels as it (1 or 3: each batch is decoded once for all of them; another input size is resized to).

    Args:
        specs: the model files, as given (duplicates are refused).
        default: the model when ``specs`` is empty (the configured one).
        configured: models of other attributes that run with every job (``INVSORT_ATTRIBUTE_MODELS``), each for an
            attribute none of ``specs`` predicts: a model the job names itself wins for its attribute.

    Raises:
        ConfigError: two models of one attribute, none of the category (a job writes each item's category), a
            model named twice, a configured model of the category, or models whose photos have different channels;
            the message says what is valid.
        FileNotFoundError, ModelFileError, OSError: a model file cannot be read or is not a model file.
    """
    specs = list(specs) or [default]
    if len(set(specs)) != len(specs):
        raise ConfigError(f"a model is named twice in {specs}: name each model file once")
    metas = {spec: load_model_meta(spec, reader=reader) for spec in specs}
    by_attribute: dict[str, str] = {}
    for spec, meta in metas.items():
        if meta.attribute in by_attribute:
            raise ConfigError(f"{by_attribute[meta.attribute]} and {spec} both predict '{meta.attribute}': a job "
                              "takes one model per attribute")
        by_attribute[meta.attribute] = spec
    named = set(by_attribute)
    for spec in dict.fromkeys(configured):
        if spec in metas:
            continue  # named by the job too
        meta = load_model_meta(spec, reader=reader)
        if meta.attribute == CATEGORY:
            raise ConfigError(f"INVSORT_ATTRIBUTE_MODELS names {spec}, which predicts '{CATEGORY}': list only models "
                              "of other attributes there (the category model is INVSORT_MODEL_PATH or --model)")
        if meta.attribute in named:
            continue  # the job's own model of this attribute wins
        if meta.attribute in by_attribute:
            raise ConfigError(f"INVSORT_ATTRIBUTE_MODELS names {by_attribute[meta.attribute]} and {spec}, which both "
                              f"predict '{meta.attribute}': list one model per attribute")
        metas[spec] = meta
        by_attribute[meta.attribute] = spec
    category_spec = by_attribute.pop(CATEGORY, None)
    if category_spec is None:
        said = ", ".join(f"{s} predicts '{m.attribute}'" for s, m in metas.items())
        raise ConfigError(f"no model predicts the category ({said}): a job writes each item's category, so name "
                          f"a model that predicts '{CATEGORY}' too (--model shoes.pt --model toe.pt)")
    channels = {m.in_chans for m in metas.values()}
    if len(channels) > 1:
        raise ConfigError("the models take photos with different channels ("
                          + ", ".join(f"{s}: {m.in_chans}" for s, m in metas.items())
                          + "): a job's models must all be grayscale or all colour (each batch is decoded once)")
    attributes = [AttributeModel(m.attribute, spec, m.name, m.version)
                  for spec, m in metas.items() if spec != category_spec]
    return JobModels(category_spec, metas[category_spec], attributes)
