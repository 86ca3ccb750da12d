//! The **content-processing** service: ingests documents and runs a processing job per document
//! (submitted, extracted, classified; re-queued once when classification fails, then failed).
//!
//! A job is an aggregate ([`Job`]); the [`Processing`] saga drives it step by step, with a
//! durable timeout between the first failed classification and the second (relaxed) attempt.
//! Its relay publishes the outcome to other services as the public contract
//! [`ContentPublished`]: `document.classified` and `document.failed`.

use std::collections::BTreeSet;
use std::time::Duration;

use factum::bus::{PublicEvents, ServiceName};
use factum::saga::{Decisions, Input, Saga};
use factum::{Aggregate, BoxError, Command, Envelope, Event};
use serde::{Deserialize, Serialize};

/// This service's name on the bus.
pub const SERVICE: &str = "content";

/// The service's name, as a [`ServiceName`].
pub fn service() -> ServiceName {
    ServiceName::new(SERVICE).expect("a valid service name")
}

/// A document to process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// Its id: lowercase letters, digits and `-` (the job's stream is `job-{id}`).
    pub id: String,
    /// Its title.
    pub title: String,
    /// Its text.
    pub text: String,
}

impl Document {
    /// A document; `id` is turned into lowercase letters, digits and `-`.
    pub fn new(id: &str, title: impl Into<String>, text: impl Into<String>) -> Self {
        let id: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        Self {
            id: id.trim_matches('-').to_owned(),
            title: title.into(),
            text: text.into(),
        }
    }
}

/// The built-in corpus: a few short texts on three topics, one of which classifies only on the
/// relaxed second attempt and one not at all.
pub fn corpus() -> Vec<Document> {
    [
        (
            "engine",
            "The Analytical Engine",
            "Ada Lovelace wrote the first program for the Analytical Engine of Charles Babbage, \
             a machine that could run an algorithm on numbers.",
        ),
        (
            "turing",
            "Computable numbers",
            "Alan Turing described a universal machine; every algorithm is a program for it. \
             Ada Lovelace had guessed as much about the Analytical Engine.",
        ),
        (
            "relativity",
            "Light and energy",
            "Albert Einstein showed that the energy of a particle is tied to its mass, and that \
             light has the same speed for everyone. Marie Curie measured the energy of radium.",
        ),
        (
            "radium",
            "Radioactivity",
            "Marie Curie and Pierre Curie found that radium gives off energy; every particle \
             that leaves it carries some away. Albert Einstein explained where the energy comes from.",
        ),
        (
            "evolution",
            "On the Origin of Species",
            "Charles Darwin argued that species change through evolution; Gregor Mendel found \
             how a gene passes from a cell to the next generation.",
        ),
        (
            "dna",
            "The double helix",
            "Rosalind Franklin photographed the structure that James Watson and Francis Crick \
             described: every gene is written in it.",
        ),
        (
            "voyage",
            "A long voyage",
            "Charles Darwin sailed on the Beagle with Robert FitzRoy and came back with \
             notebooks full of drawings.",
        ),
    ]
    .into_iter()
    .map(|(id, title, text)| Document::new(id, title, text))
    .collect()
}

/// Reads every `.txt` file of `dir` as a document (its id from the file name, its title from
/// the first line).
pub fn read_dir(dir: &std::path::Path) -> std::io::Result<Vec<Document>> {
    let mut documents = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("txt") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("doc");
        let title = text.lines().next().unwrap_or(stem).trim().to_owned();
        documents.push(Document::new(stem, title, text));
    }
    Ok(documents)
}

/// Words that are capitalised without being names.
const STOPWORDS: &[&str] = &[
    "The", "This", "That", "These", "Those", "There", "Then", "They", "Their", "When", "Where",
    "What", "Which", "While", "With", "From", "Into", "And", "But", "For", "Every", "Each", "Some",
    "His", "Her", "Its", "Our", "Was", "Were", "Has", "Had", "Have", "Not", "All", "Any", "One",
    "Two", "How", "Why", "Who", "After", "Before", "Once", "Also", "Yet",
];

/// The entities of a text: its capitalised words of three letters or more that are not
/// stop words (The, This, When...), deduplicated and sorted.
pub fn extract_terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| {
            w.len() >= 3
                && w.chars().next().is_some_and(char::is_uppercase)
                && !STOPWORDS.contains(w)
        })
        .map(str::to_owned)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The topics and their keywords.
pub const TOPICS: &[(&str, &[&str])] = &[
    (
        "computing",
        &[
            "algorithm",
            "machine",
            "program",
            "computer",
            "software",
            "numbers",
        ],
    ),
    (
        "physics",
        &["energy", "particle", "light", "mass", "quantum", "speed"],
    ),
    (
        "biology",
        &[
            "gene",
            "cell",
            "species",
            "evolution",
            "organism",
            "generation",
        ],
    ),
];

/// The topic of a text: the one with most distinct keywords in it, provided it has at least two
/// (one when `relaxed`); ties go to the first in [`TOPICS`]. `None`: not classifiable.
pub fn classify(text: &str, relaxed: bool) -> Option<&'static str> {
    let words: BTreeSet<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .collect();
    let needed = if relaxed { 1 } else { 2 };
    let mut best: Option<(&'static str, usize)> = None;
    for (topic, keywords) in TOPICS {
        let found = keywords.iter().filter(|k| words.contains(**k)).count();
        if found >= needed && best.is_none_or(|(_, n)| found > n) {
            best = Some((topic, found));
        }
    }
    best.map(|(topic, _)| topic)
}

// ---------------------------------------------------------------------------------------------
// The processing job.

/// What can be asked of a processing job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Command)]
#[command(id = job)]
pub enum JobCommand {
    /// Submit a document (a repeat of a submitted job is a no-op).
    Submit {
        /// The job: the document's id.
        job: String,
        /// The document.
        document: Document,
        /// How long a job whose classification failed waits before the second attempt, in ms.
        requeue_after_ms: u64,
    },
    /// Extract its entities.
    Extract {
        /// The job.
        job: String,
    },
    /// Classify it (`relaxed`: the second attempt, one keyword is enough).
    Classify {
        /// The job.
        job: String,
        /// The second, relaxed attempt.
        relaxed: bool,
    },
    /// Put it back in the queue after a failed classification.
    Requeue {
        /// The job.
        job: String,
        /// Why.
        reason: String,
    },
    /// Give up on it.
    Fail {
        /// The job.
        job: String,
        /// Why.
        reason: String,
    },
}

/// What happened to a processing job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "job")]
pub enum JobEvent {
    /// `job.submitted`
    Submitted {
        /// The document.
        document: Document,
        /// The wait before a second classification, in ms.
        requeue_after_ms: u64,
    },
    /// `job.extracted`
    Extracted {
        /// Its entities.
        terms: Vec<String>,
    },
    /// `job.classified`
    Classified {
        /// Its topic.
        topic: String,
        /// The document's title.
        title: String,
        /// Its entities.
        terms: Vec<String>,
        /// On the relaxed second attempt.
        relaxed: bool,
    },
    /// `job.retried`: back in the queue.
    Retried {
        /// Attempts so far.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// `job.failed`
    Failed {
        /// Why.
        reason: String,
    },
}

/// Why a job refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Not submitted yet.
    #[error("job {0} was not submitted")]
    NotSubmitted(String),
    /// Already classified or failed.
    #[error("job {0} is finished")]
    Finished(String),
    /// Classified before its entities were extracted.
    #[error("job {0} has no extracted entities yet")]
    NotExtracted(String),
    /// No topic matches the text.
    #[error("no topic has {needed} keyword(s) in document {job}")]
    Unclassifiable {
        /// The job.
        job: String,
        /// The keywords needed.
        needed: usize,
    },
}

/// Where a job stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JobStatus {
    /// Not submitted.
    #[default]
    New,
    /// Submitted.
    Submitted,
    /// Entities extracted.
    Extracted,
    /// Back in the queue.
    Requeued,
    /// Classified under this topic.
    Classified(String),
    /// Failed, for this reason.
    Failed(String),
}

/// A processing job's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Aggregate)]
#[aggregate(type = "job", command = JobCommand, event = JobEvent, error = JobError)]
pub struct Job {
    /// Where it stands.
    pub status: JobStatus,
    /// The document.
    pub document: Option<Document>,
    /// Its entities, once extracted.
    pub terms: Vec<String>,
    /// Times it was re-queued.
    pub attempts: u32,
}

impl Job {
    fn decide(&self, command: &JobCommand) -> Result<Vec<JobEvent>, JobError> {
        let finished = matches!(self.status, JobStatus::Classified(_) | JobStatus::Failed(_));
        match command {
            JobCommand::Submit {
                document,
                requeue_after_ms,
                ..
            } => Ok(match self.status {
                JobStatus::New => vec![JobEvent::Submitted {
                    document: document.clone(),
                    requeue_after_ms: *requeue_after_ms,
                }],
                _ => Vec::new(),
            }),
            JobCommand::Extract { job } | JobCommand::Classify { job, .. }
                if self.document.is_none() =>
            {
                Err(JobError::NotSubmitted(job.clone()))
            }
            JobCommand::Extract { .. } | JobCommand::Classify { .. } if finished => Ok(Vec::new()),
            JobCommand::Extract { .. } => {
                let document = self.document.as_ref().expect("checked above");
                Ok(vec![JobEvent::Extracted {
                    terms: extract_terms(&format!("{}. {}", document.title, document.text)),
                }])
            }
            JobCommand::Classify { job, .. } if self.status == JobStatus::Submitted => {
                Err(JobError::NotExtracted(job.clone()))
            }
            JobCommand::Classify { job, relaxed } => {
                let document = self.document.as_ref().expect("checked above");
                match classify(&format!("{} {}", document.title, document.text), *relaxed) {
                    Some(topic) => Ok(vec![JobEvent::Classified {
                        topic: topic.to_owned(),
                        title: document.title.clone(),
                        terms: self.terms.clone(),
                        relaxed: *relaxed,
                    }]),
                    None => Err(JobError::Unclassifiable {
                        job: job.clone(),
                        needed: if *relaxed { 1 } else { 2 },
                    }),
                }
            }
            JobCommand::Requeue { job, .. } | JobCommand::Fail { job, .. }
                if self.document.is_none() =>
            {
                Err(JobError::NotSubmitted(job.clone()))
            }
            JobCommand::Requeue { job, .. } | JobCommand::Fail { job, .. } if finished => {
                Err(JobError::Finished(job.clone()))
            }
            JobCommand::Requeue { reason, .. } => Ok(vec![JobEvent::Retried {
                attempt: self.attempts + 1,
                reason: reason.clone(),
            }]),
            JobCommand::Fail { reason, .. } => Ok(vec![JobEvent::Failed {
                reason: reason.clone(),
            }]),
        }
    }

    fn evolve(&mut self, event: &JobEvent) {
        match event {
            JobEvent::Submitted { document, .. } => {
                self.document = Some(document.clone());
                self.status = JobStatus::Submitted;
            }
            JobEvent::Extracted { terms } => {
                self.terms = terms.clone();
                self.status = JobStatus::Extracted;
            }
            JobEvent::Classified { topic, .. } => {
                self.status = JobStatus::Classified(topic.clone())
            }
            JobEvent::Retried { attempt, .. } => {
                self.attempts = *attempt;
                self.status = JobStatus::Requeued;
            }
            JobEvent::Failed { reason } => self.status = JobStatus::Failed(reason.clone()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The processing saga.

/// What the processing saga reacts to: the jobs' own events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum ProcessingInput {
    /// A document was submitted.
    #[event(name = "job.submitted")]
    Submitted {
        /// The document.
        document: Document,
        /// The wait before a second classification, in ms.
        requeue_after_ms: u64,
    },
    /// Its entities were extracted.
    #[event(name = "job.extracted")]
    Extracted {
        /// Its entities.
        terms: Vec<String>,
    },
}

/// What a processing instance records about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(prefix = "processing")]
pub enum ProcessingChange {
    /// `processing.started`
    Started {
        /// The job.
        job: String,
        /// The wait before a second classification, in ms.
        requeue_after_ms: u64,
    },
    /// `processing.classifying`
    Classifying {
        /// 1 or 2.
        attempt: u32,
    },
    /// `processing.requeued`: the first classification failed; a durable timeout brings the job
    /// back.
    Requeued {
        /// Why.
        reason: String,
    },
    /// `processing.gave_up`
    GaveUp {
        /// Why.
        reason: String,
    },
}

/// The name of the timeout between the two classification attempts.
pub const REQUEUE_TIMEOUT: &str = "requeue";

/// The processing saga: one instance per job. Submitted → extract; extracted → classify;
/// classification refused → re-queue the job and wait (a durable timeout); the wait is over →
/// classify again, relaxed; refused again → fail the job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Processing {
    /// The job.
    pub job: Option<String>,
    /// The wait before the second attempt.
    pub requeue_after: Duration,
    /// Classification attempts started.
    pub attempt: u32,
    /// Waiting for the re-queue timeout.
    pub waiting: bool,
    /// Given up.
    pub gave_up: bool,
}

impl Saga for Processing {
    const NAME: &'static str = "processing";
    type Event = ProcessingInput;
    type Change = ProcessingChange;
    type Timeout = ();

    fn instance(event: &Envelope<ProcessingInput>) -> Option<String> {
        Some(event.stream_id.aggregate_id().to_owned())
    }

    fn react(&self, input: Input<'_, Self>, then: &mut Decisions<Self>) -> Result<(), BoxError> {
        match input {
            Input::Event(event) => match &event.event {
                ProcessingInput::Submitted {
                    document,
                    requeue_after_ms,
                } if self.job.is_none() => {
                    then.record(ProcessingChange::Started {
                        job: document.id.clone(),
                        requeue_after_ms: *requeue_after_ms,
                    });
                    then.send::<Job>(JobCommand::Extract {
                        job: document.id.clone(),
                    })?;
                }
                ProcessingInput::Extracted { .. } if self.attempt == 0 => {
                    if let Some(job) = &self.job {
                        then.record(ProcessingChange::Classifying { attempt: 1 });
                        then.send::<Job>(JobCommand::Classify {
                            job: job.clone(),
                            relaxed: false,
                        })?;
                    }
                }
                _ => {}
            },
            Input::Rejected(rejection) => {
                let (Some(job), Some(JobError::Unclassifiable { .. })) =
                    (&self.job, rejection.error::<Job>())
                else {
                    return Ok(());
                };
                if self.attempt == 1 && !self.waiting {
                    let reason = rejection.reason();
                    then.record(ProcessingChange::Requeued {
                        reason: reason.clone(),
                    });
                    then.send::<Job>(JobCommand::Requeue {
                        job: job.clone(),
                        reason,
                    })?;
                    then.schedule(REQUEUE_TIMEOUT, self.requeue_after, ())?;
                } else if self.attempt == 2 && !self.gave_up {
                    let reason = format!("not classified after 2 attempts: {}", rejection.reason());
                    then.record(ProcessingChange::GaveUp {
                        reason: reason.clone(),
                    });
                    then.send::<Job>(JobCommand::Fail {
                        job: job.clone(),
                        reason,
                    })?;
                }
            }
            Input::Timeout(_) => {
                if let (Some(job), true) = (&self.job, self.waiting) {
                    then.record(ProcessingChange::Classifying { attempt: 2 });
                    then.send::<Job>(JobCommand::Classify {
                        job: job.clone(),
                        relaxed: true,
                    })?;
                }
            }
        }
        Ok(())
    }

    fn evolve(&mut self, change: &ProcessingChange) {
        match change {
            ProcessingChange::Started {
                job,
                requeue_after_ms,
            } => {
                self.job = Some(job.clone());
                self.requeue_after = Duration::from_millis(*requeue_after_ms);
            }
            ProcessingChange::Classifying { attempt } => {
                self.attempt = *attempt;
                self.waiting = false;
            }
            ProcessingChange::Requeued { .. } => self.waiting = true,
            ProcessingChange::GaveUp { .. } => self.gave_up = true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The public contract.

/// What content-processing publishes: the outcome of each job, without its internal steps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Event)]
pub enum ContentPublished {
    /// A document was classified.
    #[event(name = "document.classified")]
    Classified {
        /// The document's id.
        document: String,
        /// Its title.
        title: String,
        /// Its topic.
        topic: String,
        /// Its entities.
        terms: Vec<String>,
    },
    /// A document could not be classified.
    #[event(name = "document.failed")]
    Failed {
        /// The document's id.
        document: String,
        /// Why.
        reason: String,
    },
}

/// The relay's routes: job outcomes (streams of category `job`), mapped to [`ContentPublished`]
/// (subjects `content.job.document.classified` and `content.job.document.failed`); the jobs'
/// other events and the saga's changes stay inside.
pub fn public_events(service: ServiceName) -> PublicEvents {
    PublicEvents::new(service)
        .map::<JobEvent, ContentPublished>("job", |e: &Envelope<JobEvent>| {
            let document = e.stream_id.aggregate_id().to_owned();
            match &e.event {
                JobEvent::Classified {
                    topic,
                    title,
                    terms,
                    ..
                } => Some(ContentPublished::Classified {
                    document,
                    title: title.clone(),
                    topic: topic.clone(),
                    terms: terms.clone(),
                }),
                JobEvent::Failed { reason } => Some(ContentPublished::Failed {
                    document,
                    reason: reason.clone(),
                }),
                _ => None,
            }
        })
        .expect("valid routes")
}
