//! The Kafka backend's own errors, mapped into [`opamp_core::Error`] by kind.

use std::fmt;

use opamp_core::Error;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// What went wrong talking to the broker.
#[derive(Debug)]
pub(super) enum KafkaBusError {
    /// librdkafka reported `source` while the bus was doing `operation`.
    Client {
        /// What the bus was doing, naming the topic, partition or group.
        operation: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// A topic the bus needs does not exist.
    MissingTopic {
        /// The topic.
        topic: String,
    },
}

impl KafkaBusError {
    /// A librdkafka error met while doing `operation`.
    pub(super) fn client(operation: impl Into<String>, source: KafkaError) -> Self {
        KafkaBusError::Client {
            operation: operation.into(),
            source,
        }
    }
}

impl fmt::Display for KafkaBusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KafkaBusError::Client { operation, .. } => f.write_str(operation),
            KafkaBusError::MissingTopic { topic } => {
                write!(
                    f,
                    "kafka topic {topic} does not exist (KafkaBus::ensure_topics creates it)"
                )
            }
        }
    }
}

impl std::error::Error for KafkaBusError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KafkaBusError::Client { source, .. } => Some(source),
            KafkaBusError::MissingTopic { .. } => None,
        }
    }
}

impl From<KafkaBusError> for Error {
    fn from(err: KafkaBusError) -> Self {
        use RDKafkaErrorCode as Code;
        let KafkaBusError::Client { operation, source } = err else {
            return Error::not_found(err.to_string());
        };
        match source.rdkafka_error_code() {
            Some(Code::MessageTimedOut | Code::RequestTimedOut | Code::OperationTimedOut | Code::TimedOutQueue) => {
                Error::timeout(operation)
            }
            Some(Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition) => {
                Error::not_found(format!("{operation}: unknown topic or partition"))
            }
            Some(
                Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidTopic
                | Code::InvalidPartitions
                | Code::InvalidReplicationFactor
                | Code::InvalidConfig
                | Code::PolicyViolation,
            ) => Error::invalid_input(format!("{operation}: {source}")),
            Some(
                Code::AllBrokersDown
                | Code::BrokerTransportFailure
                | Code::Resolve
                | Code::QueueFull
                | Code::NetworkException
                | Code::BrokerNotAvailable
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
                | Code::CoordinatorNotAvailable
                | Code::NotCoordinator
                | Code::RebalanceInProgress
                | Code::NotEnoughReplicas
                | Code::NotEnoughReplicasAfterAppend
                | Code::KafkaStorageError,
            ) => Error::Unavailable {
                message: operation,
                source: Some(Box::new(source)),
            },
            _ => Error::backend("kafka", operation, source),
        }
    }
}

/// A librdkafka error met while doing `operation`, as a public [`Error`].
pub(super) fn client_error(operation: impl Into<String>, source: KafkaError) -> Error {
    KafkaBusError::client(operation, source).into()
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn kinds_follow_the_error_code() {
        let timeout = client_error(
            "sending to t",
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        );
        assert!(matches!(timeout, Error::Timeout { .. }), "{timeout:?}");
        let down = client_error(
            "sending to t",
            KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown),
        );
        assert!(down.is_retryable());
        assert_eq!(down.to_string(), "unavailable: sending to t");
        assert!(down.source().is_some(), "the librdkafka error is the source");
        let unknown = client_error(
            "reading t",
            KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
        );
        assert!(matches!(unknown, Error::NotFound { .. }), "{unknown:?}");
        let big = client_error(
            "sending to t",
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        );
        assert!(matches!(big, Error::InvalidInput { .. }), "{big:?}");
        let other = client_error("x", KafkaError::Canceled);
        assert!(matches!(other, Error::Backend { backend: "kafka", .. }), "{other:?}");
        let missing: Error = KafkaBusError::MissingTopic {
            topic: "opamp.events".into(),
        }
        .into();
        assert!(missing.to_string().contains("opamp.events"), "{missing}");
    }
}
