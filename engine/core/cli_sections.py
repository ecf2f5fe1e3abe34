"""Click help with options under headings (as Polygraphy's argument groups), and commands that pass
their arguments on to a module's own ``main(argv)``. Only click is imported here: ``--help`` stays instant."""
from __future__ import annotations

import click


class SectionedCommand(click.Command):
    """A command whose --help lists its options under the headings of ``sections`` ({title: option
    names}, in that order); an option named in no section is under "Options", last."""

    sections: dict[str, tuple[str, ...]] = {}

    def __init__(self, *args, sections: dict[str, tuple[str, ...]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if sections is not None:
            self.sections = sections

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            title = next((t for t, names in self.sections.items() if set(names) & set(param.opts)), "Options")
            records.setdefault(title, []).append(record)
        for title in [*self.sections, "Options"]:
            if title in records:
                with formatter.section(title if title == "Options" else f"{title} options"):
                    formatter.write_dl(records[title])


ARGV_KEY = "segengine.argv"


class ForwardingCommand(SectionedCommand):
    """Click checks and documents the options; the callback finds the arguments exactly as given in
    ``ctx.meta[ARGV_KEY]``, for a module's own ``main(argv)`` (one parser of record, e.g. the one
    ``python -m segengine.train.train`` uses)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)
