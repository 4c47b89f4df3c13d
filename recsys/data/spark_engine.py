"""Preparation on Apache Spark: the same SQL steps as DuckDB (``recsys.data.steps``), on a cluster.

    spark-submit --master yarn jobs/spark/prepare.py data=parquet data.path=hdfs:///logs \\
        data.root=/shared/prepared                                   # a cluster
    python -m recsys.prepare data.engine=spark data=parquet data.path=logs/     # a local session

``run_spark`` takes the place of ``recsys.data.engine.run_duckdb`` in ``recsys.data.prepare.prepare``:
the front ends, the checks, the order of the steps and the output layout are shared
(``recsys.data.engine.run_steps``); only execution differs. Each step's table is a DataFrame
persisted in memory and on disk (``MEMORY_AND_DISK``) and registered as a temporary view; the
training and test rows are written by the executors (ordered, so the part files concatenate in
order) and renamed ``part-00000.parquet``, ...; the vocabularies and counts are written by Spark and
streamed into their files by the driver. The prepared directory must be on a file system the
driver can read (a shared POSIX path on a cluster); the source can be any path Spark reads
(HDFS, S3 through s3a://, ...) when it is Parquet.

The output equals DuckDB's for the same input: identical vocabularies, splits, rows and counts
(tests compare the two on ``local[2]``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import List, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import SparkSession

from recsys.config import DataConfig
from recsys.data.engine import Engine, Relation, read_error, run_steps, stage_source
from recsys.data.layout import number_parts, parts_to_file
from recsys.data.steps import SPARK

ROW_BYTES = 24
"""Approximate bytes per prepared row, to size Spark's Parquet row groups (set in bytes) near
``data.row_group_size`` rows."""


def local_session(threads: int = 0, memory: str = "2g") -> SparkSession:
    """A local Spark session (``local[threads]``, 0: all cores) for ``data.engine=spark`` outside a
    cluster and for the tests."""
    master = f"local[{threads}]" if threads else "local[*]"
    return (SparkSession.builder.master(master).appName("recsys-prepare")
            .config("spark.driver.memory", memory)
            .config("spark.sql.shuffle.partitions", "8")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .getOrCreate())


class SparkEngine(Engine):
    """The steps on a Spark session."""

    dialect = SPARK

    def __init__(self, spark: SparkSession, tmp: Path, row_group_size: int) -> None:
        self.spark, self.tmp = spark, tmp
        self.scratch = tmp / "_spark"
        self.scratch.mkdir(exist_ok=True)
        self.row_group_bytes = max(row_group_size * ROW_BYTES, 1 << 20)
        self.tables: List = []

    def fetchall(self, sql: str) -> List[tuple]:
        return [tuple(r) for r in self.spark.sql(sql).collect()]

    def batches(self, sql: str):
        directory = self._write(sql, f"q{len(list(self.scratch.iterdir()))}")
        for f in number_parts(directory):
            yield from pq.ParquetFile(f).iter_batches()

    def create_table(self, name: str, sql: str) -> None:
        df = self.spark.sql(sql).persist(StorageLevel.MEMORY_AND_DISK)
        df.count()  # materialise now: later steps and outputs reuse it
        df.createOrReplaceTempView(name)
        self.tables.append(df)

    def create_view(self, name: str, sql: str) -> None:
        self.spark.sql(sql).createOrReplaceTempView(name)

    def _write(self, sql: str, name: str, directory: Optional[Path] = None) -> Path:
        directory = directory or self.scratch / name
        (self.spark.sql(sql).write.mode("overwrite").option("parquet.block.size", self.row_group_bytes)
         .option("compression", "snappy").parquet(directory.resolve().as_uri()))
        return directory

    def write_parquet(self, sql: str, directory: Path, row_group_size: int) -> None:
        self._write(sql, directory.name, directory)
        number_parts(directory)

    def write_file(self, sql: str, path: Path) -> None:
        parts = number_parts(self._write(sql, path.stem))
        schema = pq.read_schema(parts[0]) if parts else None
        # Spark writes its types (string, bigint); the layout's are the same Arrow types.
        parts_to_file(parts, path, pa.schema([f.with_nullable(True) for f in schema]))

    def register(self, name: str, relation: Relation, keep: List[str]) -> None:
        select = self.dialect.source_columns(relation.columns, relation.kinds, keep)
        df = self.spark.read.parquet(*[Path(f).resolve().as_uri() if "://" not in f else f for f in relation.files])
        if relation.staged:
            select += ["_file", "_row"]
        else:
            df = df.selectExpr("*", "_metadata.file_path AS _meta_file", "_metadata.row_index AS _meta_row")
            select += ["regexp_replace(_meta_file, '^file:(//)?', '') AS _file", "_meta_row + 1 AS _row"]
        df.createOrReplaceTempView(f"{name}_files")
        self.spark.sql(f"SELECT {', '.join(select)} FROM {name}_files").createOrReplaceTempView(name)

    def close(self) -> None:
        for df in self.tables:
            df.unpersist()
        shutil.rmtree(self.scratch, ignore_errors=True)


def spark_runner(spark: SparkSession):
    """``recsys.data.prepare.prepare``'s `engine` argument for a Spark session."""
    def run_spark(cfg: DataConfig, tmp: Path, version: int, progress: Optional[bool] = None) -> dict:
        t0 = time.perf_counter()
        # dates and zone-less timestamps as UTC seconds, as DuckDB reads them, whatever the cluster's zone
        spark.conf.set("spark.sql.session.timeZone", "UTC")
        staged = stage_source(cfg, tmp, progress)
        engine = SparkEngine(spark, tmp, cfg.row_group_size)
        try:
            manifest = run_steps(engine, cfg, staged, tmp, version, progress, read_error(staged))
        finally:
            engine.close()
        manifest["engine"] = {"name": "spark", "version": spark.version, "master": spark.sparkContext.master}
        manifest["prepare_s"] = round(time.perf_counter() - t0, 3)
        return manifest
    return run_spark
