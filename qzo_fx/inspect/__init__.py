"""Inspection: tables, code, diffs, networkx graphs, SVG, and examine()."""
