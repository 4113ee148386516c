"""The plan: every stage of the study, made from the kinds' declarations (kinds.KINDS), with what each depends on."""

from dataclasses import dataclass, field

from aecurves.errors import UserError

from .kinds import KINDS, Kind, Sizes
from .settings import Settings

NO_SIZES = Sizes()  # a stage made alone: its cost is not needed


@dataclass
class Stage:
    name: str           # endpoint:mse:1, extra:mse:1, align:mse:1-2, curve:mse:1-2, aligned-curve:mse:1-2, ...
    kind: str           # the kind of work: endpoint, extra, align, curve, eval, ..., report
    label: str          # what the progress line shows
    folder: str         # relative to the study folder
    loss: str | None = None
    seeds: tuple = ()
    inputs: list = field(default_factory=list)  # files (relative) this stage is made from
    units: float = 0.0  # relative cost, for the time estimate
    deps: tuple = ()    # the stages that make its inputs (the report: every other stage)
    makes: tuple = ("checkpoint.pt",)  # its files other stages take as inputs (relative to its folder)

    @property
    def step(self) -> str:
        """Its declaration's name (kinds.KINDS): its name up to the loss (curve and aligned-curve are both curves)."""
        return self.name.split(":")[0]


def make_stage(kind: Kind, s: Settings, loss: str, seeds: tuple, sizes: Sizes = NO_SIZES) -> Stage:
    names = {"loss": loss, **({"s": seeds[0]} if len(seeds) == 1 else {"a": seeds[0], "b": seeds[1]})}
    return Stage(f"{kind.name}:{loss}:{'-'.join(map(str, seeds))}", kind.kind, kind.label.format(**names),
                 kind.folder.format(**names), loss, seeds, kind.inputs(s, loss, seeds),
                 units=kind.cost(sizes, s, loss), makes=kind.makes(s))


def plan(s: Settings, n_train: int, n_test: int, perceptual: bool = False) -> list[Stage]:
    """Every stage of the study in order: per loss group, the kinds round by round (a round's kinds seed by seed or
    pair by pair), then the report. Each stage's `units` estimate its cost (kinds.Sizes); `perceptual`: evaluations
    also measure the VGG perceptual metric."""
    sizes = Sizes(n_train, n_test, perceptual)
    stages = []
    for loss in s.losses:
        for round_ in sorted({k.round for k in KINDS.values()}):
            kinds = [k for k in KINDS.values() if k.round == round_ and k.when(s)]
            for unit in _units(s, kinds):  # the kinds of a round share theirs (per seed, or per pair)
                stages += [make_stage(k, s, loss, unit, sizes) for k in kinds]
    stages.append(Stage("report", "report", "report", "."))
    return with_dependencies(stages)


def _units(s: Settings, kinds: list[Kind]) -> list[tuple]:
    """The seeds (1-tuples) or pairs the stages of `kinds` are made for, in order."""
    pers = {k.per for k in kinds}
    if not pers:
        return []
    if len(pers) > 1:
        raise ValueError(f"the kinds of one round must all be per seed or all per pair: {[k.name for k in kinds]}")
    per = pers.pop()
    return [(seed,) for seed in s.seeds] if per == "seed" else s.pairs if per == "pair" else s.pairs[:1]


def with_dependencies(stages: list[Stage]) -> list[Stage]:
    """Each stage's deps: the stages whose outputs are its input files (so they are not written twice); the report
    depends on every other stage. The list's order stays a valid order to run them in."""
    made_by = {}
    for st in stages:
        if st.kind == "report":
            st.deps = tuple(s.name for s in stages if s.kind != "report")
        else:
            st.deps = tuple(dict.fromkeys(made_by[p] for p in st.inputs))
        for name in st.makes:
            made_by[f"{st.folder}/{name}"] = st.name
    return stages


def stage_named(s: Settings, name: str) -> Stage:
    """The stage `name` of the study, made alone (a stage's job needs its own stage, not the plan; no cost, no
    deps)."""
    step, loss, seeds = name.split(":")
    return make_stage(KINDS[step], s, loss, tuple(int(x) for x in seeds.split("-")))


def select_forced(selectors: list[str], stages: list[Stage]) -> set[str]:
    """Stage names matched by the --force selectors; an unknown selector is an error."""
    chosen = set()
    sections = {k.section for k in KINDS.values()}  # a section is named as --force names its kinds
    for sel in selectors:
        sel = sel.strip().lower()
        hit = {st.name for st in stages
               if sel == "all" or sel == st.name or (sel in sections and _section(st) == sel)
               or sel == st.loss or st.name.startswith(sel + ":")}
        if not hit:
            names = ", ".join(st.name for st in stages)
            raise UserError(f"--force {sel!r} matches no stage of this study. Stage names: {names}; or one of "
                            f"{', '.join(dict.fromkeys(k.section for k in KINDS.values()))}, report, a loss (e.g. "
                            "mse), a prefix such as curve:mse, or all.")
        chosen |= hit
    return chosen


def _section(st: Stage) -> str | None:
    return KINDS[st.step].section if st.step in KINDS else None


def loss_group(s: Settings, loss: str) -> dict:
    """One loss group's record for study.json: the folders of its stages, by each kind's group_key (per seed:
    {seed: folder}; per pair: in each pair's entry; the plane: its pair and folder). Whether it runs is added by the
    study (vgg needs the VGG weights)."""
    group = {"status": "run", "seeds": list(s.seeds), "pairs": [{"seeds": [a, b]} for a, b in s.pairs]}
    for kind in KINDS.values():
        if not kind.when(s):
            continue
        if kind.per == "seed":
            group[kind.group_key] = {str(seed): kind.folder_of(loss, (seed,)) for seed in s.seeds}
        elif kind.per == "pair":
            for pair in group["pairs"]:
                pair[kind.group_key] = kind.folder_of(loss, tuple(pair["seeds"]))
        else:
            first = group["pairs"][0]["seeds"]
            group[kind.group_key] = {"seeds": first, "folder": kind.folder_of(loss, tuple(first))}
    return group
