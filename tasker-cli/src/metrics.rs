//! Reading Prometheus text exposition (what `/metrics` serves) back into numbers.

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` suffixes for histograms).
    pub name: String,
    /// Label pairs.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

/// All samples of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// The samples, in exposition order.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses exposition text; comment and malformed lines are skipped.
    pub fn parse(text: &str) -> Self {
        let samples =
            text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect();
        Metrics { samples }
    }

    /// Sum of `name` over samples whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v)))
            .map(|s| s.value)
            .sum()
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        None => (head.to_owned(), Vec::new()),
        Some((name, rest)) => {
            let inner = rest.strip_suffix('}')?;
            (name.to_owned(), parse_labels(inner))
        }
    };
    Some(Sample { name, labels, value })
}

fn parse_labels(inner: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = inner;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end.min(after.len())..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_with_labels_and_sums_by_label() {
        let text = "# HELP x y\n# TYPE tasker_tasks_discovered_total counter\n\
            tasker_tasks_discovered_total{via=\"event\"} 7\n\
            tasker_tasks_discovered_total{via=\"poll\"} 3\n\
            tasker_info{service=\"worker\",mode=\"Hybrid\",instance_id=\"a,b\"} 1\n\
            plain 2.5\n";
        let m = Metrics::parse(text);
        assert_eq!(m.sum("tasker_tasks_discovered_total", &[]), 10.0);
        assert_eq!(m.sum("tasker_tasks_discovered_total", &[("via", "poll")]), 3.0);
        assert_eq!(m.sum("tasker_info", &[("instance_id", "a,b"), ("mode", "Hybrid")]), 1.0);
        assert_eq!(m.sum("plain", &[]), 2.5);
    }
}
