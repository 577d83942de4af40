# The containerised path (see docker-compose.yml). Multi-stage: build with the Rust toolchain,
# run from a slim image as an unprivileged user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY migrations ./migrations
COPY src ./src
RUN cargo build --release --locked --bin contact-sync

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home contact-sync
COPY --from=build /src/target/release/contact-sync /usr/local/bin/contact-sync
USER contact-sync
EXPOSE 9187 8089
ENTRYPOINT ["contact-sync"]
CMD ["run"]
