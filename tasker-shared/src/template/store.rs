//! Publishing and finding templates.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::{TaskTemplate, Version};
use crate::error::{Error, Result};
use crate::identifier::Identifier;

/// A template as stored, with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTemplate {
    /// Row id, referenced by tasks.
    pub template_id: i64,
    /// The template.
    pub template: TaskTemplate,
    /// When it was published.
    pub created_at: DateTime<Utc>,
}

/// Whether publishing stored something new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new version was stored.
    Created,
    /// This exact version was already published with the same definition.
    Unchanged,
}

/// Publishes a template version, creating its namespace if needed. Publishing
/// the same version with the same definition again is a no-op, so services can
/// load their templates at every start; a different definition under an existing
/// version is a [`Error::Conflict`]: published versions are immutable.
///
/// Two statements; run it in a transaction to make it atomic.
pub async fn publish_template(conn: &mut sqlx::PgConnection, template: &TaskTemplate) -> Result<PublishOutcome> {
    template.validate()?;
    let definition = template.definition();
    let version = template.version.to_string();

    sqlx::query!(
        "INSERT INTO tasker.namespaces (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        template.namespace.as_str(),
    )
    .execute(&mut *conn)
    .await?;

    let inserted = sqlx::query_scalar!(
        r#"INSERT INTO tasker.task_templates (namespace, name, version, definition)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT ON CONSTRAINT task_templates_version_unique DO NOTHING
           RETURNING template_id"#,
        template.namespace.as_str(),
        template.name.as_str(),
        version,
        definition,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if inserted.is_some() {
        return Ok(PublishOutcome::Created);
    }

    let existing = find_template(&mut *conn, &template.namespace, &template.name, Some(template.version))
        .await?
        .ok_or_else(|| Error::Conflict("template version was deleted while publishing".into()))?;
    if existing.template.definition() == definition {
        Ok(PublishOutcome::Unchanged)
    } else {
        Err(Error::Conflict(format!(
            "template {}/{} version {} is already published with a different definition; \
             publish a new version",
            template.namespace, template.name, template.version
        )))
    }
}

/// Finds a template version, or the highest version when `version` is `None`.
pub async fn find_template(
    executor: impl PgExecutor<'_>,
    namespace: &Identifier,
    name: &Identifier,
    version: Option<Version>,
) -> Result<Option<StoredTemplate>> {
    let row = sqlx::query!(
        r#"SELECT template_id, namespace, name, version, definition, created_at
           FROM tasker.task_templates
           WHERE namespace = $1 AND name = $2 AND ($3::text IS NULL OR version = $3)
           ORDER BY string_to_array(version, '.')::int[] DESC
           LIMIT 1"#,
        namespace.as_str(),
        name.as_str(),
        version.map(|v| v.to_string()),
    )
    .fetch_optional(executor)
    .await?;
    row.map(|r| stored(r.template_id, &r.namespace, &r.name, &r.version, r.definition, r.created_at)).transpose()
}

/// Every published template version, by namespace, name and version.
pub async fn list_templates(executor: impl PgExecutor<'_>) -> Result<Vec<StoredTemplate>> {
    let rows = sqlx::query!(
        r#"SELECT template_id, namespace, name, version, definition, created_at
           FROM tasker.task_templates
           ORDER BY namespace, name, string_to_array(version, '.')::int[]"#
    )
    .fetch_all(executor)
    .await?;
    rows.into_iter()
        .map(|r| stored(r.template_id, &r.namespace, &r.name, &r.version, r.definition, r.created_at))
        .collect()
}

fn stored(
    template_id: i64,
    namespace: &str,
    name: &str,
    version: &str,
    definition: serde_json::Value,
    created_at: DateTime<Utc>,
) -> Result<StoredTemplate> {
    let corrupt = |what: String| Error::Conflict(format!("stored template {template_id} is unreadable: {what}"));
    let template = TaskTemplate::from_stored(
        namespace.parse().map_err(|e| corrupt(format!("{e}")))?,
        name.parse().map_err(|e| corrupt(format!("{e}")))?,
        version.parse().map_err(|e| corrupt(format!("{e}")))?,
        definition,
    )
    .map_err(|e| corrupt(e.to_string()))?;
    Ok(StoredTemplate { template_id, template, created_at })
}
