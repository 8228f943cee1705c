//! A real tonic gRPC server for the waypoint's gRPC-JSON transcoding tests and benchmark: the
//! `zmesh.test.shelf.Shelves` service of proto/zmesh/test/shelf.proto, compiled at build time,
//! with the descriptor set the waypoint's config points at.
//!
//! Behaviour the tests rely on:
//! - `GetShelf`: shelf `id` with theme `shelf-<id>`; id 0 is INVALID_ARGUMENT, ids of 1000 and
//!   more are NOT_FOUND (both as trailers-only responses, as tonic sends errors).
//! - `CreateShelf`: the shelf given, with id 1.
//! - `ListBooks`: one book per `authors` entry (or `page_size` books by "anon"), named
//!   `<parent>/books/<n>`, with `filter.min_pages` pages and `filter.genre`.
//! - `StreamBooks`: the same books, one message each; with `filter.min_pages == 13` it fails
//!   with ABORTED after the first two books (an error mid-stream).
//! - `Echo`: the request.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};

// Generated code: its style is tonic-build's.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("zmesh.test.shelf");
}

use pb::shelves_server::{Shelves, ShelvesServer};
use pb::{
    Book, CreateShelfRequest, EchoMessage, GetShelfRequest, ListBooksRequest, ListBooksResponse,
    Shelf,
};

/// The service's FileDescriptorSet (its imports included), as `protoc --include_imports
/// --descriptor_set_out` writes it.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/shelf.fds"));

/// The magic `filter.min_pages` that makes `StreamBooks` fail mid-stream.
pub const FAIL_MID_STREAM: i64 = 13;

#[derive(Default)]
struct Library;

fn books(req: &ListBooksRequest) -> Vec<Book> {
    let filter = req.filter.unwrap_or_default();
    let authors: Vec<String> = if req.authors.is_empty() {
        (0..req.page_size.max(0))
            .map(|_| "anon".to_string())
            .collect()
    } else {
        req.authors.clone()
    };
    authors
        .into_iter()
        .enumerate()
        .map(|(n, author)| Book {
            name: format!("{}/books/{n}", req.parent),
            author,
            pages: filter.min_pages,
            genre: filter.genre,
        })
        .collect()
}

type BookStream = Pin<Box<dyn Stream<Item = Result<Book, Status>> + Send>>;

#[tonic::async_trait]
impl Shelves for Library {
    async fn get_shelf(&self, req: Request<GetShelfRequest>) -> Result<Response<Shelf>, Status> {
        let id = req.into_inner().shelf_id;
        match id {
            0 => Err(Status::invalid_argument("shelf_id must be set")),
            1000.. => Err(Status::not_found(format!("shelf {id} not found"))),
            _ => Ok(Response::new(Shelf {
                id,
                theme: format!("shelf-{id}"),
                genre: pb::Genre::Fiction as i32,
            })),
        }
    }

    async fn create_shelf(
        &self,
        req: Request<CreateShelfRequest>,
    ) -> Result<Response<Shelf>, Status> {
        let mut shelf = req.into_inner().shelf.unwrap_or_default();
        shelf.id = 1;
        Ok(Response::new(shelf))
    }

    async fn list_books(
        &self,
        req: Request<ListBooksRequest>,
    ) -> Result<Response<ListBooksResponse>, Status> {
        Ok(Response::new(ListBooksResponse {
            books: books(req.get_ref()),
        }))
    }

    type StreamBooksStream = BookStream;

    async fn stream_books(
        &self,
        req: Request<ListBooksRequest>,
    ) -> Result<Response<BookStream>, Status> {
        let req = req.into_inner();
        let fail = req
            .filter
            .as_ref()
            .is_some_and(|f| f.min_pages == FAIL_MID_STREAM);
        let mut items: Vec<Result<Book, Status>> = books(&req).into_iter().map(Ok).collect();
        if fail {
            items.truncate(2);
            items.push(Err(Status::aborted("the shelf was moved mid-stream")));
        }
        Ok(Response::new(Box::pin(futures_util::stream::iter(items))))
    }

    async fn echo(&self, req: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        Ok(Response::new(req.into_inner()))
    }
}

/// Serves the service on `listener` (HTTP/2 cleartext, as tonic serves) until the task is
/// dropped.
pub async fn serve(listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| s);
        Some((conn, l))
    });
    tonic::transport::Server::builder()
        .add_service(ShelvesServer::new(Library))
        .serve_with_incoming(incoming)
        .await
}
