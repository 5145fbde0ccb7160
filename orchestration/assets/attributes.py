"""User and item attributes into Feast: the side features the rankers read (``features.attributes``).

    entity_attributes  (a replay source's attribute files → Feast views user_attributes / item_attributes,
                        offline rows for point-in-time training and the latest row per entity online)

The source is the asset's run config (the launchpad in the UI, ``encore attributes`` on the command line):
``synthetic`` (the default, the simulator world ``make run`` replays: each track's genre and album) or a
MovieLens name with its folder (``u.user``/``u.item``, ``users.dat``/``movies.dat``). Loading is idempotent:
only new entities and changed values are written (``features.attributes.sync_attributes``), and a change
holds from the load on, so a ranking example before it still reads the value of its time.
"""

import time

import dagster as dg

from orchestration.assets.ingest import INGEST
from orchestration.resources import EncoreResource, FeastResource


class AttributesConfig(dg.Config):
    source: str = "synthetic"  # synthetic | ml-100k | ml-1m (features.datasets)
    dataset_dir: str | None = None  # the dataset's folder (MovieLens sources)


@dg.asset(group_name=INGEST, kinds={"feast", "parquet"},
          description="user demographics and item genres/albums in the Feast attribute views (ranker features)")
def entity_attributes(context: dg.AssetExecutionContext, config: AttributesConfig, encore: EncoreResource,
                      feast: FeastResource) -> dg.MaterializeResult:
    from features.attributes import source_attributes, sync_attributes

    settings = encore.settings()
    users, items = source_attributes(config.source, settings, config.dataset_dir)
    written = sync_attributes(feast.store(settings), settings, users=users, items=items,
                              now_ms=int(time.time() * 1000))
    read = {"users": 0 if users is None else len(users), "items": 0 if items is None else len(items)}
    context.log.info(f"{config.source}: read {read['users']} users and {read['items']} items; wrote "
                     f"{written.get('user_attributes', 0)} user and {written.get('item_attributes', 0)} item rows "
                     "(new or changed)")
    return dg.MaterializeResult(metadata={"source": config.source, "users_read": read["users"],
                                          "items_read": read["items"],
                                          "user_rows_written": written.get("user_attributes", 0),
                                          "item_rows_written": written.get("item_attributes", 0)})
