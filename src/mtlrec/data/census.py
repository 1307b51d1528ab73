"""The census-income (KDD) data of the MMoE paper (Ma et al., KDD 2018, Section 6.3).

The bundled file is the data set's *test* file (99,762 rows; the training file is not
available here), split 60/20/20 into train/valid/test by a hash of the row number
(:func:`mtlrec.data.split.hash_split`, seed 0). Task groups of the paper:

* group 1: ``income`` (> 50K) and ``never_married`` (marital status "Never married");
* group 2: ``education`` (Associates degree or higher) and ``never_married``.

Education and marital status are removed from the inputs in both groups (they are labels), as is
the census instance weight.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

COLUMNS = (
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "instance_weight",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",
    "income_label",
)
HEAVY_TAILED = (
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
)
CONTINUOUS = (
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
)
NOT_INPUTS = ("education", "marital_stat", "instance_weight", "income_label")
COLLEGE = (
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)
FILE = "census-income.test.gz"


def read_census(path: str | None = None) -> pa.Table:
    """The raw census table with the three label columns added (0/1 int8)."""
    src = path or str(resources.files("mtlrec.datasets").joinpath(FILE))
    table = pacsv.read_csv(
        src,
        read_options=pacsv.ReadOptions(column_names=list(COLUMNS)),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in COLUMNS},
            null_values=[],
            strings_can_be_null=False,
        ),
    )
    cols = {c: pc.utf8_trim_whitespace(table.column(c)) for c in COLUMNS}
    for c in CONTINUOUS:
        cols[c] = pc.cast(cols[c], pa.float64())
    income = pc.equal(cols["income_label"], "50000+.")
    never = pc.equal(cols["marital_stat"], "Never married")
    college = pc.is_in(cols["education"], value_set=pa.array(COLLEGE))
    cols["income"] = pc.cast(income, pa.int8())
    cols["never_married"] = pc.cast(never, pa.int8())
    cols["college"] = pc.cast(college, pa.int8())
    return pa.table(cols)


def census_schema(task_group: int = 1, *, embedding_dim: int = 8) -> Schema:
    """Default schema: categorical columns embedded; continuous ones standardised (money
    amounts after log1p)."""
    if task_group == 1:
        tasks = (
            TaskSpec(name="income", kind="binary"),
            TaskSpec(name="never_married", kind="binary"),
        )
    elif task_group == 2:
        tasks = (
            TaskSpec(name="college", kind="binary"),
            TaskSpec(name="never_married", kind="binary"),
        )
    else:
        raise ValueError(f"census task_group must be 1 or 2, got {task_group}")
    feats: list = []
    for c in COLUMNS:
        if c in NOT_INPUTS:
            continue
        if c in CONTINUOUS:
            tf = "log1p_standardize" if c in HEAVY_TAILED else "standardize"
            feats.append(DenseFeature(name=c, transform=tf))
        else:
            feats.append(SparseFeature(name=c, embedding_dim=embedding_dim))
    return Schema(features=tuple(feats), tasks=tasks)


def census_rate_check(table: pa.Table) -> dict[str, float]:
    """Label rates (for the data README's figures: 6.20% / 43.25% / 19.50%)."""
    return {
        k: float(np.mean(table.column(k).to_numpy()))
        for k in ("income", "never_married", "college")
    }
