"""A saved view of MLflow's UI that shows the fields' effects first.

MLflow's UI (3.x) lays out an experiment's chart view by itself: one section per metric prefix
(``effect_l2/assay`` is in section ``effect_l2``), sections and charts sorted by name, whatever
order the metrics were logged in. ``contrib_l2`` and ``contrib_share`` therefore come before
``effect_l2``, the numbers to rank fields by. The UI's saved views (its "Views" menu, kept as
experiment tags named ``mlflow.sharedViewState.<id>``) can hold another order: every experiment cae
records into gets one, "cae: field effects first", whose sections start with ``effect_l2``. Opening
it (Views, or ``#/experiments/<id>/runs?viewStateShareKey=cae-field-effects``) shows the chart
view with each field's effect over epochs, one line per run, at the top.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from cae.tracking.outbox import TRACKING_ERRORS, first_line

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

VIEW_ID = "cae-field-effects"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"  # the UI's prefix for saved views
VIEW_NAME = "cae: field effects first"
# The first sections, in order; the UI appends every other metric's section after them.
FIRST_SECTIONS = ("effect_l2", "contrib_share", "contrib_l2")


def effects_view() -> str:
    """The saved view as the UI stores it: an envelope (name, times) around the page's state,
    here the chart sections in :data:`FIRST_SECTIONS` order, marked as placed by hand so that
    the UI keeps that order and adds the charts of every metric into them."""
    sections = [
        {"uuid": f"cae-{name}", "name": name, "display": True, "isReordered": False,
         "deleted": False, "isGenerated": True}
        for name in FIRST_SECTIONS
    ]  # fmt: skip
    state = {"compareRunSections": sections, "compareRunCharts": [], "isAccordionReordered": True}
    now = int(time.time() * 1000)
    return json.dumps(
        {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    )


def add_effects_view(client: MlflowClient, experiment_id: str) -> None:
    """Give the experiment the saved view "cae: field effects first", unless it has one by that
    id (a view the user changed stays as it is). A store that refuses is only logged: the view
    is a convenience, never a reason to stop a training."""
    try:
        if VIEW_TAG not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, VIEW_TAG, effects_view())
    except TRACKING_ERRORS as err:
        log.info("could not add the saved view %r to experiment %s: %s", VIEW_NAME,
                 experiment_id, first_line(err))  # fmt: skip
