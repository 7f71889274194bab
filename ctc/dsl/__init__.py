"""The recipe language: grammar (recipe.lark), AST, parser, printer, checker and diagnostics."""

from ctc.dsl.ast import Check, Dataset, Emit, ModelSource, Recipe, SelectorItem, Span, Step, Target
from ctc.dsl.check import check_recipe, check_with_module
from ctc.dsl.diagnostics import Diagnostic, RecipeError
from ctc.dsl.parser import parse, parse_file
from ctc.dsl.printer import print_recipe

__all__ = ["Check", "Dataset", "Diagnostic", "Emit", "ModelSource", "Recipe", "RecipeError", "SelectorItem", "Span",
           "Step", "Target", "check_recipe", "check_with_module", "parse", "parse_file", "print_recipe"]
