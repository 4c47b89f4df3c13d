"""Prepare a dataset with Apache Spark: the same steps and the same layout as the embedded DuckDB.

    spark-submit --master yarn --deploy-mode client \
        --conf spark.executor.memory=16g --conf spark.sql.shuffle.partitions=2000 \
        jobs/spark/prepare.py data=parquet data.path=hdfs:///warehouse/clicks \
        data.user_column=uid data.item_column=sku data.root=/shared/recsys/data

The arguments are the Hydra overrides of ``recsys.train``: the dataset is written where a training
run with the same overrides looks for it (``<data.root>/<name>-<hash>/``, a path the driver can
write and every training node can read), and training reuses it unchanged. The recsys package
must be importable by the driver (``pip install recsys`` on the submitting host, or
``--py-files``); the executors only run Spark SQL.
"""

from __future__ import annotations

import logging
import sys

from hydra import compose, initialize_config_dir
from pyspark.sql import SparkSession

from recsys import cli
from recsys.data.prepare import data_config, prepare
from recsys.data.spark_engine import spark_runner


def main(argv) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        cfg = cli.start(compose(config_name="command", overrides=list(argv)))
    spark = SparkSession.builder.appName("recsys-prepare").getOrCreate()
    with cli.command_errors():
        path = prepare(data_config(cfg), engine=spark_runner(spark))
    print(f"prepared: {path}", flush=True)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
