//! Task templates: a versioned DAG of steps, and the rules that make one valid.
//!
//! [`TaskTemplate::validate`] gives precise errors for the API; the schema's
//! `tasker.validate_template_definition()` trigger enforces the structural rules
//! again for any writer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::identifier::Identifier;

mod store;

pub use store::{PublishOutcome, StoredTemplate, find_template, list_templates, publish_template};

/// The most steps one template may have.
pub const MAX_STEPS: usize = 200;

/// A published template: which steps a task runs, and in what order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskTemplate {
    /// The namespace the template (and its steps, and their workers) belong to.
    pub namespace: Identifier,
    /// The template's name within its namespace.
    pub name: Identifier,
    /// The version; a published version never changes.
    pub version: Version,
    /// The steps, each naming the steps it depends on.
    pub steps: Vec<StepTemplate>,
}

/// One step of a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTemplate {
    /// Unique within the template.
    pub name: Identifier,
    /// The handler a worker runs for this step.
    pub handler: Identifier,
    /// Steps that must complete before this one runs.
    #[serde(default)]
    pub depends_on: Vec<Identifier>,
    /// Handler configuration, passed to the handler as is.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// Attempts before the step fails for good (1 to 100).
    #[serde(default = "StepTemplate::default_max_attempts")]
    pub max_attempts: i32,
    /// Base delay before a retry; doubles with each attempt (0 to 24 h).
    #[serde(default = "StepTemplate::default_backoff_ms")]
    pub backoff_ms: i32,
    /// How long one attempt may run before it counts as failed (1 ms to 24 h).
    #[serde(default = "StepTemplate::default_timeout_ms")]
    pub timeout_ms: i32,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

const DAY_MS: i32 = 86_400_000;

impl StepTemplate {
    /// Default `max_attempts`.
    pub const fn default_max_attempts() -> i32 {
        3
    }
    /// Default `backoff_ms`.
    pub const fn default_backoff_ms() -> i32 {
        1_000
    }
    /// Default `timeout_ms`.
    pub const fn default_timeout_ms() -> i32 {
        30_000
    }
}

/// A template version, `MAJOR.MINOR.PATCH`, ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    /// Incompatible changes.
    pub major: u32,
    /// Compatible additions.
    pub minor: u32,
    /// Fixes.
    pub patch: u32,
}

/// Why a template is invalid. Each message names the step or field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// No steps.
    #[error("a template needs at least one step")]
    NoSteps,
    /// More than [`MAX_STEPS`] steps.
    #[error("a template may have at most {MAX_STEPS} steps, found {0}")]
    TooManySteps(usize),
    /// Two steps share a name.
    #[error("step name `{0}` is used twice")]
    DuplicateStep(String),
    /// A dependency names no step of the template.
    #[error("step `{step}` depends on unknown step `{dependency}`")]
    UnknownDependency {
        /// The depending step.
        step: String,
        /// The missing name.
        dependency: String,
    },
    /// A step lists the same dependency twice, or itself.
    #[error("step `{step}` lists dependency `{dependency}` {problem}")]
    BadDependency {
        /// The depending step.
        step: String,
        /// The offending dependency.
        dependency: String,
        /// "twice" or "on itself".
        problem: &'static str,
    },
    /// The dependencies form a cycle; the steps on it, in order.
    #[error("steps form a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// A numeric field is out of range.
    #[error("step `{step}`: {field} must be between {min} and {max}, found {found}")]
    OutOfRange {
        /// The step.
        step: String,
        /// The field.
        field: &'static str,
        /// Lowest allowed.
        min: i32,
        /// Highest allowed.
        max: i32,
        /// The value given.
        found: i32,
    },
    /// `config` is not a JSON object.
    #[error("step `{0}`: config must be a JSON object")]
    ConfigNotObject(String),
}

impl TaskTemplate {
    /// Checks every rule: step count, unique names, known dependencies, no
    /// cycles, ranges. Returns the first problem found.
    pub fn validate(&self) -> Result<(), TemplateError> {
        if self.steps.is_empty() {
            return Err(TemplateError::NoSteps);
        }
        if self.steps.len() > MAX_STEPS {
            return Err(TemplateError::TooManySteps(self.steps.len()));
        }

        let mut names = HashSet::with_capacity(self.steps.len());
        for step in &self.steps {
            if !names.insert(step.name.as_str()) {
                return Err(TemplateError::DuplicateStep(step.name.to_string()));
            }
        }

        for step in &self.steps {
            step.validate_fields()?;
            let mut seen = HashSet::new();
            for dependency in &step.depends_on {
                let problem = if dependency == &step.name {
                    Some("on itself")
                } else if !seen.insert(dependency) {
                    Some("twice")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(TemplateError::BadDependency {
                        step: step.name.to_string(),
                        dependency: dependency.to_string(),
                        problem,
                    });
                }
                if !names.contains(dependency.as_str()) {
                    return Err(TemplateError::UnknownDependency {
                        step: step.name.to_string(),
                        dependency: dependency.to_string(),
                    });
                }
            }
        }

        match self.find_cycle() {
            Some(cycle) => Err(TemplateError::Cycle(cycle)),
            None => Ok(()),
        }
    }

    /// Depth-first search for a back edge; returns the cycle it closes.
    fn find_cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Unvisited,
            OnPath,
            Done,
        }
        let index: HashMap<&str, usize> = self.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
        let mut marks = vec![Mark::Unvisited; self.steps.len()];

        for root in 0..self.steps.len() {
            if marks[root] != Mark::Unvisited {
                continue;
            }
            // Iterative DFS: (step, next dependency to look at).
            let mut path: Vec<(usize, usize)> = vec![(root, 0)];
            marks[root] = Mark::OnPath;
            while let Some((step, next)) = path.last_mut() {
                let deps = &self.steps[*step].depends_on;
                if *next == deps.len() {
                    marks[*step] = Mark::Done;
                    path.pop();
                    continue;
                }
                let dep = index[deps[*next].as_str()];
                *next += 1;
                match marks[dep] {
                    Mark::Unvisited => {
                        marks[dep] = Mark::OnPath;
                        path.push((dep, 0));
                    }
                    Mark::OnPath => {
                        // path runs from dependents to dependencies; the cycle is the
                        // part of it from `dep` onwards. Report it in execution order.
                        let start = path.iter().position(|(s, _)| *s == dep).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            path[start..].iter().map(|(s, _)| self.steps[*s].name.to_string()).collect();
                        cycle.reverse();
                        cycle.push(cycle[0].clone());
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            }
        }
        None
    }

    /// The steps in an order where every step comes after its dependencies.
    /// Only meaningful for a validated template.
    pub fn topological_order(&self) -> Vec<&StepTemplate> {
        let mut done: HashSet<&str> = HashSet::new();
        let mut order = Vec::with_capacity(self.steps.len());
        while order.len() < self.steps.len() {
            let before = order.len();
            for step in &self.steps {
                if !done.contains(step.name.as_str()) && step.depends_on.iter().all(|d| done.contains(d.as_str())) {
                    done.insert(step.name.as_str());
                    order.push(step);
                }
            }
            if order.len() == before {
                break; // a cycle: validate() reports it
            }
        }
        order
    }

    /// The definition as stored in `task_templates.definition`.
    pub fn definition(&self) -> serde_json::Value {
        serde_json::json!({ "steps": self.steps })
    }

    /// Rebuilds a template from its stored parts.
    pub fn from_stored(
        namespace: Identifier,
        name: Identifier,
        version: Version,
        definition: serde_json::Value,
    ) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Definition {
            steps: Vec<StepTemplate>,
        }
        let Definition { steps } = serde_json::from_value(definition)?;
        Ok(TaskTemplate { namespace, name, version, steps })
    }

    /// For each step name, the names of the steps that depend on it.
    pub fn dependents(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut map: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for step in &self.steps {
            for dep in &step.depends_on {
                map.entry(dep.as_str()).or_default().push(step.name.as_str());
            }
        }
        map
    }
}

impl StepTemplate {
    fn validate_fields(&self) -> Result<(), TemplateError> {
        let ranges: [(&'static str, i32, i32, i32); 3] = [
            ("max_attempts", self.max_attempts, 1, 100),
            ("backoff_ms", self.backoff_ms, 0, DAY_MS),
            ("timeout_ms", self.timeout_ms, 1, DAY_MS),
        ];
        for (field, found, min, max) in ranges {
            if !(min..=max).contains(&found) {
                return Err(TemplateError::OutOfRange { step: self.name.to_string(), field, min, max, found });
            }
        }
        if !self.config.is_object() {
            return Err(TemplateError::ConfigNotObject(self.name.to_string()));
        }
        Ok(())
    }
}

/// Why a string is not a `MAJOR.MINOR.PATCH` version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a version: expected MAJOR.MINOR.PATCH, e.g. 1.0.0")]
pub struct InvalidVersion(pub String);

impl FromStr for Version {
    type Err = InvalidVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidVersion(s.chars().take(40).collect());
        let mut parts = s.split('.');
        let mut next = || -> Result<u32, InvalidVersion> {
            let part = parts.next().ok_or_else(invalid)?;
            if part.is_empty() || part.len() > 9 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            part.parse().map_err(|_| invalid())
        };
        let version = Version { major: next()?, minor: next()?, patch: next()? };
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(version)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(steps: &[(&str, &[&str])]) -> TaskTemplate {
        let steps = steps
            .iter()
            .map(|(name, deps)| serde_json::json!({"name": name, "handler": "noop", "depends_on": deps}))
            .collect::<Vec<_>>();
        serde_json::from_value(serde_json::json!({
            "namespace": "test", "name": "t", "version": "1.0.0", "steps": steps
        }))
        .expect("well-formed template")
    }

    #[test]
    fn a_diamond_is_valid_and_ordered_by_dependencies() {
        let t = template(&[("d", &["b", "c"]), ("b", &["a"]), ("c", &["a"]), ("a", &[])]);
        t.validate().expect("valid");
        let order: Vec<_> = t.topological_order().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_cycle_is_rejected_with_the_steps_on_it() {
        let t = template(&[("a", &[]), ("b", &["a", "d"]), ("c", &["b"]), ("d", &["c"])]);
        let err = t.validate().expect_err("cycle");
        let TemplateError::Cycle(cycle) = &err else { panic!("expected a cycle, got {err}") };
        assert_eq!(cycle.first(), cycle.last());
        let mut on_cycle: Vec<_> = cycle[1..].to_vec();
        on_cycle.sort();
        assert_eq!(on_cycle, ["b", "c", "d"]);
        assert!(err.to_string().starts_with("steps form a cycle: "));
    }

    #[test]
    fn an_unknown_dependency_is_named() {
        let t = template(&[("a", &[]), ("b", &["ghost"])]);
        assert_eq!(t.validate().expect_err("dangling").to_string(), "step `b` depends on unknown step `ghost`");
    }

    #[test]
    fn duplicate_names_self_dependencies_and_ranges_are_rejected() {
        let dup = template(&[("a", &[]), ("a", &[])]);
        assert_eq!(dup.validate(), Err(TemplateError::DuplicateStep("a".into())));

        let selfdep = template(&[("a", &["a"])]);
        assert!(matches!(selfdep.validate(), Err(TemplateError::BadDependency { problem: "on itself", .. })));

        let mut t = template(&[("a", &[])]);
        t.steps[0].max_attempts = 0;
        assert!(t.validate().expect_err("range").to_string().contains("max_attempts"));

        let empty = template(&[]);
        assert_eq!(empty.validate(), Err(TemplateError::NoSteps));
    }

    #[test]
    fn unknown_fields_and_bad_names_fail_to_parse() {
        let typo = serde_json::json!({"namespace": "n", "name": "t", "version": "1.0.0",
            "steps": [{"name": "a", "handler": "noop", "depends": []}]});
        assert!(serde_json::from_value::<TaskTemplate>(typo).is_err());
        let bad_name = serde_json::json!({"namespace": "N;drop", "name": "t", "version": "1.0.0",
            "steps": [{"name": "a", "handler": "noop"}]});
        assert!(serde_json::from_value::<TaskTemplate>(bad_name).is_err());
    }

    #[test]
    fn versions_parse_and_order_numerically() {
        let v = |s: &str| s.parse::<Version>().expect(s);
        assert!(v("1.10.0") > v("1.9.9"));
        assert_eq!(v("2.0.1").to_string(), "2.0.1");
        for bad in ["1.0", "1.0.0.0", "a.b.c", "1..0", "-1.0.0", "1.0.0-rc1"] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }
}
