"""The slice views a cross-section can be rendered in: those of the current layout, by name.

Slicer's layouts name their slice views freely ("Red", "Yellow+", "Slice4", ...), and
`layoutManager().sliceWidget(name)` returns None for a view that the current layout does not
show, and keeps (hidden) the views of earlier layouts. These take the layout manager as an argument
(Qt-free, so they are tested with a stand-in); None (no main window, `--no-main-window`) means no views.
"""
from __future__ import annotations

from typing import List


def slice_view_names(layout_manager) -> List[str]:
    """Names of the slice views shown by the current layout, in Slicer's order (none without a layout).

    `sliceViewNames()` also lists the views that earlier layouts created and the current one hides:
    only the visible ones are offered."""
    if layout_manager is None:
        return []
    names = []
    for name in layout_manager.sliceViewNames():
        widget = layout_manager.sliceWidget(name)
        if widget is not None and _visible(widget):
            names.append(str(name))
    return names


def _visible(widget) -> bool:
    visible = getattr(widget, "isVisible", None)
    if callable(visible):
        return bool(visible())
    return bool(getattr(widget, "visible", True))


def slice_widget(layout_manager, name: str):
    """The slice widget called `name`, or None when the current layout does not show it."""
    if layout_manager is None or not name:
        return None
    return layout_manager.sliceWidget(name)


def slice_node(layout_manager, name: str):
    """The slice node of the view called `name`; ValueError saying what to do when it is not shown."""
    widget = slice_widget(layout_manager, name)
    if widget is None or not _visible(widget):
        shown = slice_view_names(layout_manager)
        choose = ("choose one of " + ", ".join(shown)) if shown else "switch to a layout with a slice view"
        raise ValueError(f"the slice view '{name or '(none)'}' is not in the current layout: {choose}")
    return widget.mrmlSliceNode()
