//! Benchmark output. Each benchmark has one flat row type (serde); the same rows are written
//! as CSV by the csv crate, printed as a table of chosen columns of that CSV, or printed as
//! JSON, so the three never disagree. The statistics of repeated measurements live here too.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// Median, min and max of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// The statistics of `xs` (at least one measurement).
    pub fn of(mut xs: Vec<f64>) -> Self {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median = if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Self {
            median,
            min: xs[0],
            max: xs[n - 1],
        }
    }
}

/// The `q` quantile of `xs` by linear interpolation between closest ranks.
pub fn percentile(xs: &[f64], q: f64) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// A point estimate with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

impl Interval {
    /// "0.953 [0.921, 0.978]".
    pub fn show(self) -> String {
        format!("{:.3} [{:.3}, {:.3}]", self.value, self.low, self.high)
    }
}

/// Bootstrap resamples drawn by [`Bootstrap::new`]: enough for stable 2.5% and 97.5%
/// percentiles, cheap beside any benchmark's own running time.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Percentile bootstrap over items (questions): the same resamples serve every statistic
/// and every contender, so intervals of contenders measured on the same items are paired.
pub struct Bootstrap {
    /// Each resample: `items` indices drawn with replacement.
    resamples: Vec<Vec<usize>>,
}

impl Bootstrap {
    /// [`BOOTSTRAP_RESAMPLES`] resamples of `items` items, drawn from `seed`.
    pub fn new(items: usize, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let resamples = (0..BOOTSTRAP_RESAMPLES)
            .map(|_| {
                (0..items)
                    .map(|_| rng.random_range(0..items.max(1)))
                    .collect()
            })
            .collect();
        Self { resamples }
    }

    /// `statistic` of all items (each index once) with the 2.5% and 97.5% percentiles of
    /// its value over the resamples. `statistic` receives the item indices to use.
    pub fn interval(&self, items: usize, statistic: impl Fn(&[usize]) -> f64) -> Interval {
        let all: Vec<usize> = (0..items).collect();
        let value = statistic(&all);
        if items == 0 {
            return Interval {
                value,
                low: value,
                high: value,
            };
        }
        let draws: Vec<f64> = self
            .resamples
            .iter()
            .map(|r| statistic(r))
            .filter(|x| x.is_finite())
            .collect();
        if draws.is_empty() {
            return Interval {
                value,
                low: value,
                high: value,
            };
        }
        Interval {
            value,
            low: percentile(&draws, 0.025),
            high: percentile(&draws, 0.975),
        }
    }
}

/// Writes `rows` to `path` as CSV, one header line named after the row type's fields.
pub fn write_csv<R: Serialize>(path: &Path, rows: &[R]) -> anyhow::Result<()> {
    super::create_parent_dir(path)?;
    let mut writer =
        csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    for row in rows {
        writer.serialize(row)?;
    }
    writer.flush()?;
    eprintln!("CSV written to {}", path.display());
    Ok(())
}

/// Prints `rows` as JSON.
pub fn print_json<R: Serialize + ?Sized>(rows: &R) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(rows)?);
    Ok(())
}

/// Prints the `columns` of `rows` (their CSV names, in that order) as an aligned table:
/// text left-aligned, numbers right-aligned with at most three decimals.
pub fn print_table<R: Serialize>(rows: &[R], columns: &[&str]) -> anyhow::Result<()> {
    let (header, records) = csv_records(rows)?;
    let picked: Vec<usize> = columns
        .iter()
        .map(|name| {
            header
                .iter()
                .position(|h| h == name)
                .with_context(|| format!("no column {name:?} in {header:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let cells: Vec<Vec<String>> = records
        .iter()
        .map(|record| picked.iter().map(|&i| display_cell(&record[i])).collect())
        .collect();
    let widths: Vec<usize> = picked
        .iter()
        .enumerate()
        .map(|(c, &i)| {
            cells
                .iter()
                .map(|row| row[c].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let numeric: Vec<bool> = (0..picked.len())
        .map(|c| cells.iter().all(|row| is_number(&row[c])))
        .collect();
    let line = |texts: Vec<&str>| {
        texts
            .iter()
            .enumerate()
            .map(|(c, text)| {
                if numeric[c] {
                    format!("{text:>width$}", width = widths[c])
                } else {
                    format!("{text:<width$}", width = widths[c])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!(
        "{}",
        line(picked.iter().map(|&i| header[i].as_str()).collect())
    );
    for row in &cells {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
    Ok(())
}

/// The CSV header and records of `rows`, as the csv crate writes them.
fn csv_records<R: Serialize>(rows: &[R]) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    let bytes = writer.into_inner().context("serialising the rows")?;
    let mut reader = csv::Reader::from_reader(bytes.as_slice());
    let header = reader.headers()?.iter().map(String::from).collect();
    let records = reader
        .records()
        .map(|r| Ok(r?.iter().map(String::from).collect()))
        .collect::<anyhow::Result<_>>()?;
    Ok((header, records))
}

fn is_number(cell: &str) -> bool {
    cell.is_empty() || cell == "-" || cell.parse::<f64>().is_ok()
}

/// A CSV cell for the eye: fractions rounded to three decimals (two past 100), empty as "-".
fn display_cell(cell: &str) -> String {
    if cell.is_empty() {
        return "-".into();
    }
    match cell.parse::<f64>() {
        Ok(x) if cell.contains(['.', 'e', 'E']) => {
            if x.abs() >= 100.0 {
                format!("{x:.1}")
            } else {
                format!("{x:.3}")
            }
        }
        _ => cell.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        name: &'static str,
        secs: f64,
        ratio: Option<f64>,
    }

    #[test]
    fn table_columns_come_from_the_csv_of_the_same_rows() {
        let rows = [
            Row {
                name: "a",
                secs: 1.23456,
                ratio: None,
            },
            Row {
                name: "bb",
                secs: 250.0,
                ratio: Some(0.5),
            },
        ];
        let (header, records) = csv_records(&rows).unwrap();
        assert_eq!(header, ["name", "secs", "ratio"]);
        assert_eq!(records[0], ["a", "1.23456", ""]);
        assert_eq!(display_cell(&records[0][1]), "1.235");
        assert_eq!(display_cell(&records[1][1]), "250.0");
        assert_eq!(display_cell(&records[0][2]), "-");
        assert!(print_table(&rows, &["name", "nope"]).is_err());
    }

    #[test]
    fn statistics_of_repeats() {
        let s = Stats::of(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.5), 3.0);
    }

    #[test]
    fn a_bootstrap_interval_holds_the_estimate_and_narrows_with_more_items() {
        fn mean(xs: &[f64]) -> impl Fn(&[usize]) -> f64 + '_ {
            move |idx: &[usize]| idx.iter().map(|&i| xs[i]).sum::<f64>() / idx.len() as f64
        }
        // Alternating 0/1 outcomes: mean 0.5, standard error 0.5/sqrt(n).
        let few: Vec<f64> = (0..20).map(|i| (i % 2) as f64).collect();
        let many: Vec<f64> = (0..500).map(|i| (i % 2) as f64).collect();
        let narrow = Bootstrap::new(many.len(), 1).interval(many.len(), mean(&many));
        let wide = Bootstrap::new(few.len(), 1).interval(few.len(), mean(&few));
        for i in [narrow, wide] {
            assert_eq!(i.value, 0.5);
            assert!(i.low < 0.5 && 0.5 < i.high, "{i:?}");
        }
        // ±1.96 standard errors, within the bootstrap's own noise.
        let half = (wide.high - wide.low) / 2.0;
        assert!((half - 1.96 * 0.5 / 20f64.sqrt()).abs() < 0.06, "{wide:?}");
        assert!(narrow.high - narrow.low < (wide.high - wide.low) / 3.0);
        // A constant has no spread.
        let ones = vec![1.0; 30];
        let flat = Bootstrap::new(30, 2).interval(30, mean(&ones));
        assert_eq!((flat.low, flat.high), (1.0, 1.0));
    }
}
