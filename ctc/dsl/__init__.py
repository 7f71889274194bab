"""The recipe language: grammar (recipe.lark), AST, parser, printer, checker and diagnostics."""

from ctc.dsl.ast import Check, Dataset, Emit, EmitFormat, ModelSource, Recipe, RecipeStep, SelectorItem, Span, Target
from ctc.dsl.diagnostics import Diagnostic, RecipeError
from ctc.dsl.parser import parse, parse_file
from ctc.dsl.printer import print_recipe


def __getattr__(name: str) -> object:
    """``check_recipe``/``check_with_module`` load the pass registry (and torch) only when used."""
    if name in ("check_recipe", "check_with_module"):
        from ctc.dsl import check

        return getattr(check, name)
    raise AttributeError(name)


__all__ = ["Check", "Dataset", "Diagnostic", "Emit", "EmitFormat", "ModelSource", "Recipe", "RecipeError",
           "RecipeStep", "SelectorItem", "Span", "Target", "check_recipe", "check_with_module", "parse", "parse_file",
           "print_recipe"]
