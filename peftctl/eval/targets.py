"""What `peftctl eval TARGET...` evaluates: each TARGET resolved to an adapter on its base, or a whole model.

A TARGET is a run folder (its adapter/ is used), an adapter folder of any method, a model folder (such as
`peftctl merge`'s output), `base:MODEL` (a model folder or hub id, loaded as it is), or `base` -- the base model of
the first adapter among the targets, loaded as that adapter was trained (same dtype and quantisation), so the
comparison isolates what the adapter adds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftctl.adapter_folder import adapter_in, trained_on
from peftctl.errors import InvalidInput, ModelNotFound
from peftctl.remote_code import check_pinned

SWITCHABLE = ("LORA", "IA3")  # peft types of which several adapters can share one loaded base


@dataclass(frozen=True)
class BaseSpec:
    """How a base model is loaded: what `load_model` needs."""

    name: str
    revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    quantization: str | None = None  # the quantization section as sorted JSON (hashable), None when unquantised

    def recipe(self):
        """The model and quantization sections of a recipe, as `peftctl.model.load_model` takes them."""
        from types import SimpleNamespace

        from peftctl.recipe.schema import ModelSection, QuantizationSection

        quant = json.loads(self.quantization) if self.quantization else None
        return SimpleNamespace(model=ModelSection(name=self.name, revision=self.revision, dtype=self.dtype,
                                                  trust_remote_code=self.trust_remote_code),
                               quantization=QuantizationSection(**quant) if quant else None)


@dataclass
class Target:
    label: str  # as given on the command line (made unique)
    kind: str  # "adapter" or "model"
    base: BaseSpec  # adapters: the base they sit on; models: the model itself
    adapter_dir: Path | None = None
    method: str | None = None  # adapters: the method name
    peft_type: str | None = None  # adapters: peft's type (None for the bottleneck adapter)
    tokenizer: str | None = None  # where its tokenizer lives
    run_dir: Path | None = None  # when given as a run folder: for defaults from its recipe.yaml

    @property
    def switchable(self) -> bool:
        return self.kind == "adapter" and self.peft_type in SWITCHABLE


def resolve_targets(specs: list[str], *, trust_remote_code: bool = False) -> list[Target]:
    """The targets as given. A base's own Python code runs only with `trust_remote_code` from the user's command
    line or recipe, never because an adapter's peftctl_adapter.json says so (see peftctl.remote_code)."""
    if not specs:
        raise InvalidInput("no TARGET given", hint="pass run folders, adapter folders, model folders, base:MODEL "
                                                   "or base")
    resolved: list[Target | None] = []
    for spec in specs:
        resolved.append(None if spec == "base" else resolve_one(spec, trust_remote_code))
    if None in resolved:
        first = next((t for t in resolved if t is not None and t.kind == "adapter"), None)
        if first is None:
            raise InvalidInput("`base` means the base model of the first adapter, and no TARGET is an adapter",
                               hint="name the model instead: base:MODEL (a folder or hub id)")
        resolved = [t if t is not None else Target("base", "model", first.base, tokenizer=first.tokenizer)
                    for t in resolved]
    seen: dict[str, int] = {}
    for target in resolved:
        count = seen.get(target.label, 0) + 1
        seen[target.label] = count
        if count > 1:
            target.label = f"{target.label}#{count}"
    return resolved


def resolve_one(spec: str, trust_remote_code: bool = False) -> Target:
    if spec.startswith("base:"):
        name = spec[len("base:"):]
        if not name:
            raise InvalidInput("base: needs a model, e.g. base:meta-llama/Meta-Llama-3-8B or base:./model")
        return _model_target(spec, name, trust_remote_code)
    path = Path(spec).expanduser().absolute()
    if path.is_dir():
        adapter_dir = adapter_in(path)
        if adapter_dir is not None:
            return _adapter_target(spec, adapter_dir, path if adapter_dir != path else None, trust_remote_code)
        if (path / "config.json").exists():
            return _model_target(spec, str(path), trust_remote_code)
        raise InvalidInput(f"{spec}: neither a run folder, an adapter folder nor a model folder",
                           hint="pass RUN/, RUN/adapter, a merged model folder, base:MODEL or base")
    if path.exists():
        raise InvalidInput(f"{spec}: a file; expected a run, adapter or model folder (or base:MODEL)")
    raise ModelNotFound(f"{spec}: no such folder", hint="pass RUN/, RUN/adapter or a model folder; a hub model is "
                                                        "named base:ORG/NAME")


def _model_target(label: str, name: str, trust_remote_code: bool = False) -> Target:
    local = Path(name).expanduser()
    if local.is_dir() or name.startswith((".", "/", "~")):
        name = str(local.absolute())
    return Target(label, "model", BaseSpec(name=name, trust_remote_code=trust_remote_code), tokenizer=name)


def _adapter_target(label: str, adapter_dir: Path, run_dir: Path | None, trust_remote_code: bool = False) -> Target:
    from peftctl.methods import runtime

    method, config = runtime.adapter_kind(adapter_dir)
    trained = trained_on(adapter_dir, config, hint="merge it onto its base (`peftctl merge --base MODEL`) and "
                                                   "evaluate the merged folder")
    name, quant = trained.name, trained.quantization
    check_pinned(name, trained.revision, trust_remote_code)
    base = BaseSpec(name=name, revision=trained.revision, dtype=trained.dtype,
                    trust_remote_code=trust_remote_code,  # the user's flag; the adapter's record only words refusals
                    quantization=json.dumps(quant, sort_keys=True) if quant else None)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").exists()
    return Target(label, "adapter", base, adapter_dir=adapter_dir, method=method,
                  peft_type=config.get("peft_type") if method != "adapter" else None,
                  tokenizer=str(adapter_dir) if has_tokenizer else name, run_dir=run_dir)


@dataclass
class Group:
    """Targets evaluated on one loaded model: a base, the switchable adapters on it, and the base itself."""

    base: BaseSpec
    members: list[Target]
    shared: bool  # adapters added by peft's adapter switching (and the base reached by disabling them)


def plan_groups(targets: list[Target]) -> list[Group]:
    """Load each base once where peft allows: LoRA (or IA3) adapters of one base share it, and a model target
    that is that base is evaluated with the adapters disabled. Other methods get a model of their own."""
    groups: list[Group] = []
    for target in targets:
        if target.switchable:
            group = next((g for g in groups if g.shared and g.base == target.base
                          and _peft_type(g) in (None, target.peft_type)), None)
            if group is not None:
                group.members.append(target)
                continue
            groups.append(Group(target.base, [target], shared=True))
        else:
            groups.append(Group(target.base, [target], shared=False))
    # A base target whose spec matches a shared group's base rides along (disable_adapter), loading nothing.
    for group in [g for g in groups if not g.shared and g.members[0].kind == "model"]:
        host = next((g for g in groups if g.shared and _same_base(g.base, group.base)), None)
        if host is not None:
            host.members.append(group.members[0])
            groups.remove(group)
    return groups


def _peft_type(group: Group) -> str | None:
    return next((m.peft_type for m in group.members if m.kind == "adapter"), None)


def _same_base(a: BaseSpec, b: BaseSpec) -> bool:
    """Only the very same load (name, revision, dtype, quantisation) is shared: `base` has its adapter's spec,
    while `base:MODEL` loads the model as saved, which may differ from how an adapter was trained on it."""
    return a == b
